"""The user's own images: `root/train/<class>/*.jpg`, `root/test/<class>/...`, optional `root/val/<class>/...`
(else the validation split is carved from train). Decoded by DataLoader workers, never all in memory;
the same `batches()` interface as the in-memory sets."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from pipeline.config import DataConfig
from pipeline.errors import UsageError
from pipeline.training.preprocess import Normalise, folder_eval_resize
from pipeline.training.splits import SPLIT_SEED, Datasets, batches_per_rank, sample_order


class FolderSet:
    def __init__(self, dataset, image_size: int, num_workers: int, train_transform=None):
        self.dataset, self.image_size, self.num_workers = dataset, image_size, num_workers
        self.train_transform = train_transform

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def subset(self, indices) -> FolderSet:
        return FolderSet(Subset(self.dataset, list(indices)), self.image_size, self.num_workers, self.train_transform)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return batches_per_rank(len(self), batch_size, world)

    def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, augment: bool = False,
                skip: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = sample_order(len(self), seed, epoch, rank, world)
        dataset = _Transformed(self.dataset, self.train_transform) if augment and self.train_transform else self.dataset
        loader = DataLoader(Subset(dataset, order[skip * batch_size:]), batch_size=batch_size,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed((seed or 0) + epoch),
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        yield from loader


class _Transformed(torch.utils.data.Dataset):
    """The same files with the training transform (random resized crop + flip) instead of the eval one."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        base = self.dataset
        while isinstance(base, Subset):
            index, base = base.indices[index], base.dataset
        path, label = base.samples[index]
        return self.transform(base.loader(path)), label


def load_imagefolder(cfg: DataConfig, normalisation: tuple[Sequence[float], Sequence[float]]):
    from torchvision import datasets, transforms

    if cfg.root is None:
        raise UsageError("data.dataset imagefolder needs data.root: a folder with train/ and test/ "
                         "(and optionally val/) holding one sub-folder per class")
    root = Path(cfg.root).expanduser()
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise UsageError(f"{root} has no {' or '.join(missing)} folder; expected {root}/train/<class>/*.jpg and "
                         f"{root}/test/<class>/*.jpg (val/ optional)")
    mean, std = normalisation
    size = cfg.image_size
    normalise = [transforms.PILToTensor(), Normalise(mean, std)]  # the one normalisation (preprocess.py)
    eval_tf = transforms.Compose([*folder_eval_resize(size), *normalise])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *normalise])

    def folder(split: str):
        try:
            return datasets.ImageFolder(str(root / split), transform=eval_tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise UsageError(f"{root / split}: {exc}; put images in one sub-folder per class") from None

    train, test = folder("train"), folder("test")
    if train.classes != test.classes:
        raise UsageError(f"{root}/train and {root}/test have different class folders; make them the same")
    train_set = FolderSet(train, size, cfg.num_workers, train_tf)
    if (root / "val").is_dir():
        val_set = FolderSet(folder("val"), size, cfg.num_workers)
    else:
        if cfg.val_size >= len(train):
            raise UsageError(f"data.val_size {cfg.val_size} leaves no training images ({len(train)} in "
                             f"{root}/train); lower data.val_size or add a val/ folder")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        train_set, val_set = train_set.subset(order[cfg.val_size:]), train_set.subset(order[:cfg.val_size])
    return Datasets("imagefolder", train_set, val_set, FolderSet(test, size, cfg.num_workers), list(train.classes),
                    tuple(mean), tuple(std))


def check_images(cfg: DataConfig) -> None:
    """Decode every image once before training, so a non-image or a truncated JPEG is named up front
    instead of crashing a DataLoader worker mid-epoch. JPEGs decode at 1/8 scale: fast, yet every byte
    is read, so truncation shows."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(cfg.root).expanduser()
    bad = []
    for path in sorted(p for split in ("train", "val", "test") for p in (root / split).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS):
        try:
            with Image.open(path) as image:
                image.draft("RGB", (cfg.image_size, cfg.image_size))
                image.load()
        except Exception:  # PIL raises many types for a damaged file; each means "cannot be decoded"
            bad.append(path)
    if bad:
        shown = ", ".join(str(p.relative_to(root)) for p in bad[:3])
        raise UsageError(f"{len(bad)} file(s) under {root} cannot be decoded as images (truncated or not an "
                         f"image: {shown}{', ...' if len(bad) > 3 else ''}); remove or replace them and run again")
