"""The user's own images: `root/train/<class>/*.jpg`, `root/test/<class>/...`, optional `root/val/<class>/...`
(else the validation split is carved from train). Decoded by DataLoader workers, never all in memory,
each file by `pipeline.training.images.open_rgb` (any mode to RGB, EXIF orientation applied, the pixel
bound `data.max_image_pixels`); a `FolderSet` is a `Split` (splits.py), like the in-memory sets."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.config import DataConfig
from pipeline.errors import UsageError
from pipeline.training.images import IMAGE_SUFFIXES, is_image_file, open_image, open_rgb, to_channels
from pipeline.training.preprocess import Normalise, folder_eval_resize
from pipeline.training.splits import SPLIT_SEED, Datasets, batches_per_rank, sample_order

SPLITS = ("train", "val", "test")


class FolderSet:
    """The files `indices` of one class-folder tree, numbered 0..len-1 in that order; labels from the file
    list (nothing decoded), images decoded batch by batch."""

    def __init__(self, base, indices: Sequence[int], image_size: int, num_workers: int,
                 eval_transform, train_transform=None):
        self.base, self.indices = base, list(indices)
        self.image_size, self.num_workers = image_size, num_workers
        self.eval_transform, self.train_transform = eval_transform, train_transform
        self.labels = torch.tensor([base.targets[i] for i in self.indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def subset(self, indices: Sequence[int] | torch.Tensor | range) -> FolderSet:
        chosen = [self.indices[int(i)] for i in indices]
        return FolderSet(self.base, chosen, self.image_size, self.num_workers, self.eval_transform,
                         self.train_transform)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return batches_per_rank(len(self), batch_size, world)

    def inputs(self, indices: Sequence[int] | torch.Tensor | range) -> torch.Tensor:
        samples = _Samples(self.base, self.indices, self.eval_transform)
        return torch.stack([samples[int(i)][0] for i in indices])

    def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, augment: bool = False,
                skip: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.indexed_batches(batch_size, seed=seed, epoch=epoch, augment=augment, skip=skip,
                                                      rank=rank, world=world):
            yield images, labels

    def indexed_batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, augment: bool = False,
                        skip: int = 0, rank: int = 0,
                        world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = sample_order(len(self), seed, epoch, rank, world)
        transform = self.train_transform if augment and self.train_transform else self.eval_transform
        loader = DataLoader(Subset(_Samples(self.base, self.indices, transform), order[skip * batch_size:]),
                            batch_size=batch_size, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed((seed or 0) + epoch),
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        try:
            yield from loader
        except UsageError as exc:  # from a worker, the message carries the worker's traceback: keep its last line
            raise UsageError(str(exc).strip().splitlines()[-1].partition("UsageError: ")[2] or str(exc)) from None


class _Samples(Dataset):
    """(transformed image, label, position) of files `indices` of `base`: the position is the sample's index
    in its FolderSet, which `indexed_batches` hands out."""

    def __init__(self, base, indices: list[int], transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        path, label = self.base.samples[self.indices[position]]
        return self.transform(self.base.loader(path)), label, position


def _class_folder(root: Path, classes: list[str], max_pixels: int | None):
    """torchvision's ImageFolder of `root`, its classes numbered as `classes` (the training split's), so that
    val/ and test/ number them alike even when one lacks a class."""
    from torchvision.datasets import ImageFolder  # here, not at import: torchvision is slow to import

    folder = ImageFolder(str(root), loader=functools.partial(open_rgb, max_pixels=max_pixels),
                         is_valid_file=is_image_file, allow_empty=True)
    index = {i: classes.index(name) for i, name in enumerate(folder.classes) if name in classes}  # not hidden ones
    folder.samples = folder.imgs = [(path, index[target]) for path, target in folder.samples if target in index]
    folder.targets = [target for _, target in folder.samples]
    folder.classes, folder.class_to_idx = list(classes), {name: i for i, name in enumerate(classes)}
    return folder


def class_folders(folder: Path) -> list[str]:
    """Sub-folder names, sorted; hidden ones (.ipynb_checkpoints, .DS_Store folders, ...) are no classes."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan(cfg: DataConfig) -> dict:
    """Every split folder's file list (nothing decoded), classes numbered as in train/; a class folder
    without images, or a val/test class that train/ lacks, is a UsageError naming the folder."""
    if cfg.root is None:
        raise UsageError("data.dataset imagefolder needs data.root: a folder with train/ and test/ "
                         "(and optionally val/) holding one sub-folder per class")
    root = Path(cfg.root).expanduser()
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise UsageError(f"{root} has no {' or '.join(missing)} folder; expected {root}/train/<class>/*.jpg and "
                         f"{root}/test/<class>/*.jpg (val/ optional)")
    classes = class_folders(root / "train")
    if len(classes) < 2:
        raise UsageError(f"{root / 'train'} has {len(classes)} class folder(s); put the images of each class in a "
                         "sub-folder of its own, at least two classes")
    folders = {}
    for split in (s for s in SPLITS if (root / s).is_dir()):
        present = set(class_folders(root / split))
        if not present:
            raise UsageError(f"{root / split} has no class folders; put its images in one sub-folder per class, "
                             f"named as in {root / 'train'}")
        extra = sorted(present - set(classes))
        if extra:
            raise UsageError(f"{root / split / extra[0]} is a class the training split lacks (no "
                             f"{root / 'train' / extra[0]}); add training images of it or remove the folder")
        folders[split] = _class_folder(root / split, classes, cfg.max_image_pixels)
        counts = torch.bincount(torch.tensor(folders[split].targets, dtype=torch.long), minlength=len(classes))
        empty = [name for name, n in zip(classes, counts.tolist()) if n == 0 and name in present]
        if empty or not folders[split].samples:
            where = root / split / empty[0] if empty else root / split
            raise UsageError(f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)} files); add images or "
                             "remove the folder")
    return folders


def load_imagefolder(cfg: DataConfig, normalisation: tuple[Sequence[float], Sequence[float]]) -> Datasets:
    from torchvision import transforms

    folders = scan(cfg)
    mean, std = normalisation
    size = cfg.image_size
    normalise = [transforms.PILToTensor(), Normalise(mean, std)]  # the one normalisation (preprocess.py)
    eval_tf = transforms.Compose([*folder_eval_resize(size), *normalise])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *normalise])

    def split(name: str, train_transform=None) -> FolderSet:
        base = folders[name]
        return FolderSet(base, range(len(base)), size, cfg.num_workers, eval_tf, train_transform)

    train = split("train", train_tf)
    if "val" in folders:
        val = split("val")
    else:
        if cfg.val_size >= len(train):
            raise UsageError(f"data.val_size {cfg.val_size} leaves no training images ({len(train)} in "
                             f"{folders['train'].root}); lower data.val_size or add a val/ folder")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        train, val = train.subset(order[cfg.val_size:]), train.subset(order[:cfg.val_size])
    return Datasets("imagefolder", train, val, split("test"), list(folders["train"].classes), tuple(mean),
                    tuple(std))


def check_images(cfg: DataConfig) -> None:
    """Decode every image the splits hold once before training, as the loader will (`open_image`, then RGB),
    so a non-image, a truncated JPEG or an image over the pixel bound is named up front instead of crashing
    a DataLoader worker mid-epoch. JPEGs decode at reduced scale: fast, yet every byte is read, so
    truncation shows."""
    bad = []
    for folder in scan(cfg).values():
        for path, _ in folder.samples:
            try:
                to_channels(open_image(path, cfg.max_image_pixels, draft=cfg.image_size), 3)
            except UsageError as exc:
                bad.append(str(exc))
    if bad:
        shown = " | ".join(bad[:3])
        raise UsageError(f"{len(bad)} file(s) under {Path(cfg.root).expanduser()} cannot be used as images ({shown}"
                         f"{' | ...' if len(bad) > 3 else ''}); remove or replace them and run again")
