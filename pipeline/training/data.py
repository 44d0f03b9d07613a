"""Datasets: Fashion-MNIST, CIFAR-10/100, the user's image folders, and a synthetic set for tests.

Small datasets are held in memory as uint8 tensors and batched here: shuffling comes from
`DistributedSampler` (so one process and N torchrun processes see the same global batches), and
augmentation (random crop with padding 4 + horizontal flip) is drawn per sample from
(seed, epoch, sample index). So a batch does not depend on the process count or on where a run was
resumed, and resuming mid-epoch replays exactly the batches that remain.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.errors import UsageError
from pipeline.training.imagefolder import load_imagefolder
from pipeline.training.preprocess import normalise
from pipeline.training.splits import SPLIT_SEED, Datasets, batches_per_rank, sample_order

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path("~/.cache/one-pipeline/data")
NOISE_SEED = 1  # data.label_noise: the same corrupted labels whatever the training seed or method
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NORMALISATION = {  # (mean, std) per channel
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


class ImageSet:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (a `Split`, splits.py)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
        self.images, self.labels = images, labels
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: torch.Tensor | range) -> ImageSet:
        indices = torch.as_tensor(list(indices) if isinstance(indices, range) else indices)
        return ImageSet(self.images[indices], self.labels[indices], self.mean, self.std)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.mean, self.std)

    def inputs(self, indices: Sequence[int] | torch.Tensor | range) -> torch.Tensor:
        chosen = indices if isinstance(indices, torch.Tensor) else list(indices)
        return self.normalise(self.images[torch.as_tensor(chosen, dtype=torch.long)])

    def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, augment: bool = False,
                skip: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised float batches (see `Split.batches`)."""
        for images, labels, _ in self.indexed_batches(batch_size, seed=seed, epoch=epoch, augment=augment, skip=skip,
                                                      rank=rank, world=world):
            yield images, labels

    def indexed_batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, augment: bool = False,
                        skip: int = 0, rank: int = 0,
                        world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`batches`, each with the indices of its samples in this set."""
        order = torch.tensor(sample_order(len(self), seed, epoch, rank, world), dtype=torch.long)
        crops = flips = None
        if augment:
            # one draw per sample of the whole set: sample i gets the same crop on every rank
            g = torch.Generator().manual_seed((seed or 0) * 100_003 + epoch)
            crops = torch.randint(0, 9, (len(self), 2), generator=g)
            flips = torch.rand(len(self), generator=g) < 0.5
        for start in range(skip * batch_size, len(order), batch_size):
            idx = order[start:start + batch_size]
            images = self.images[idx]
            if augment:
                images = _crop_and_flip(images, crops[idx], flips[idx])
            yield self.normalise(images), self.labels[idx], idx

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return batches_per_rank(len(self), batch_size, world)


def training_batches(size: int, batch_size: int, world: int, accumulate: int) -> int:
    """Training batches per rank and epoch: the last, incomplete batch is dropped when one of its
    `accumulate` interleaved micro-batches would hold a single image, which BatchNorm cannot train on."""
    full, rest = divmod(-(-size // world), batch_size)
    return full + (rest >= 2 * accumulate)


def _crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop with zero padding 4 (offsets in 0..8) and horizontal flip, for a whole batch."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    rows = offsets[:, 0, None] + torch.arange(h)
    cols = offsets[:, 1, None] + torch.arange(w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def load_datasets(cfg: DataConfig) -> Datasets:
    """Load the configured dataset, carve the validation split from its training images, keep
    `train_size` of the rest, drawn with SPLIT_SEED, and corrupt `label_noise` of their labels, drawn
    with NOISE_SEED: the same images and labels whatever the training seed."""
    data = _load_splits(cfg)
    if cfg.train_size is not None:
        if cfg.train_size > len(data.train):
            raise UsageError(f"data.train_size {cfg.train_size} is more than the {len(data.train)} training images "
                             f"left after data.val_size {cfg.val_size}; lower it, or leave it out to use them all")
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(SPLIT_SEED))
        data.train = data.train.subset(order[:cfg.train_size].tolist())  # shuffled: folders come class by class
    if cfg.label_noise:
        data.train.labels = noisy_labels(data.train.labels, cfg.label_noise, data.num_classes)
    return data


def noisy_labels(labels: torch.Tensor, share: float, num_classes: int) -> torch.Tensor:
    """Symmetric label noise: round(share x N) labels, drawn with NOISE_SEED, each moved to a uniformly
    random *other* class (so exactly that share is wrong)."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    changed = torch.randperm(len(labels), generator=g)[:round(share * len(labels))]
    shift = torch.randint(1, num_classes, (len(changed),), generator=g)
    noisy = labels.clone()
    noisy[changed] = (labels[changed] + shift) % num_classes
    return noisy


def _load_splits(cfg: DataConfig) -> Datasets:
    if cfg.dataset == "fashion-mnist":
        (train_x, train_y), (test_x, test_y) = _fashion_mnist(cfg)
        classes = list(FASHION_CLASSES)
    elif cfg.dataset in ("cifar10", "cifar100"):
        (train_x, train_y), (test_x, test_y), classes = _cifar(cfg)
    elif cfg.dataset == "imagefolder":
        return load_imagefolder(cfg, NORMALISATION["imagefolder"])
    else:
        (train_x, train_y), (test_x, test_y) = synthetic_images(cfg.synthetic_size)
        classes = [f"synthetic-{i}" for i in range(4)]
    mean, std = NORMALISATION[cfg.dataset]
    if cfg.val_size >= len(train_y):
        raise UsageError(f"data.val_size {cfg.val_size} leaves no training images (the training split has "
                         f"{len(train_y)}); lower data.val_size")
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    full = ImageSet(train_x, train_y, mean, std)
    return Datasets(cfg.dataset, full.subset(order[cfg.val_size:]), full.subset(order[:cfg.val_size]),
                    ImageSet(test_x, test_y, mean, std), classes, mean, std)


def synthetic_images(train_size: int, classes: int = 4, side: int = 16) -> tuple:
    """SYNTHETIC data for tests only: each class is a fixed smooth random pattern plus noise, learnable in
    a few steps and robust to the crop augmentation."""
    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(classes, 3, 4, 4, generator=g) * 255
    patterns = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % classes
        noise = torch.randn(n, 3, side, side, generator=g) * 40
        return (patterns[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    return make(train_size), make(max(train_size // 2, classes))


# --- Fashion-MNIST (IDX files) -------------------------------------------------------------------
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzip'ed): magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    fix = "delete it and download it again (or reinstall dataset-fashion-mnist)"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    # EOFError is a truncated .gz; left alone, Click would turn it into a bare "Aborted."
    except (OSError, EOFError, zlib.error) as exc:
        raise UsageError(f"{path} is damaged ({exc or type(exc).__name__}); {fix}") from None
    if len(raw) < 4:
        raise UsageError(f"{path} is empty or truncated ({len(raw)} bytes); {fix}")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or len(raw) < 4 + 4 * ndim:
        raise UsageError(f"{path} is not a uint8 IDX file; {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); re-download it")
    return torch.from_numpy(data.reshape(dims).copy())


def _fashion_mnist(cfg: DataConfig) -> tuple:
    roots = [Path(cfg.root).expanduser()] if cfg.root else [DEFAULT_ROOT.expanduser(), DEBIAN_FASHION_MNIST]
    candidates = [d for r in roots for d in (r, r / "FashionMNIST" / "raw")]
    found = next((d for d in candidates if all((d / f).exists() for pair in FASHION_FILES.values() for f in pair)),
                 None)
    if found is None and cfg.download:
        found = _download("FashionMNIST", roots[0]) / "FashionMNIST" / "raw"
    if found is None:
        raise UsageError(f"Fashion-MNIST not found in {', '.join(map(str, candidates))}; install it with "
                         "'apt-get install dataset-fashion-mnist', or set data.root to a folder holding the "
                         "*-ubyte.gz files, or set data.download: true when online")
    splits = []
    for images_file, labels_file in FASHION_FILES.values():
        images, labels = read_idx(found / images_file), read_idx(found / labels_file)
        splits.append((images.unsqueeze(1), labels.long()))
    return splits


# --- CIFAR (torchvision's python pickles) ----------------------------------------------------------
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's files are pickles: allow numpy arrays and nothing else, so a planted file runs no code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        return _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable CIFAR file ({exc}); re-download the dataset") from None


def _cifar(cfg: DataConfig) -> tuple:
    folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUT[cfg.dataset]
    root = Path(cfg.root or DEFAULT_ROOT).expanduser()
    if not (root / folder / train_files[0]).exists():
        if not cfg.download:
            raise UsageError(f"{cfg.dataset} not found in {root / folder}; set data.root to the folder that holds "
                             f"'{folder}', or set data.download: true when online")
        _download("CIFAR10" if cfg.dataset == "cifar10" else "CIFAR100", root)

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_unpickle(root / folder / f) for f in files]
        images = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(p[label_key]) for p in parts])
        return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))

    meta = root / folder / meta_file
    classes = [n.decode() for n in _unpickle(meta)[names_key]] if meta.exists() else (
        list(CIFAR10_CLASSES) if cfg.dataset == "cifar10" else [str(i) for i in range(100)])
    return read(train_files), read(test_files), classes


def _download(name: str, root: Path) -> Path:
    import torchvision

    try:
        getattr(torchvision.datasets, name)(str(root), train=True, download=True)
        getattr(torchvision.datasets, name)(str(root), train=False, download=True)
    except Exception as exc:  # offline, proxy, disk: all mean the same to the user
        raise UsageError(f"could not download {name} to {root} ({type(exc).__name__}: {exc}); put the files in "
                         "data.root by hand (see docs/DATA.md)") from None
    return root
