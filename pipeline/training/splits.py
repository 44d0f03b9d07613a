"""What every dataset kind shares (the in-memory sets of `data`, the image files of `imagefolder`):
the `Split` interface, the split seed, the per-rank sample order and the `Datasets` bundle. Both import
it; neither the other. Stages use a split through `Split` alone, so a stage written against one kind
runs on the other (tests/test_own_images.py runs every stage on a folder set that exposes nothing else)."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch.utils.data import DistributedSampler

SPLIT_SEED = 0  # the validation split is the same whatever the training seed


@runtime_checkable
class Split(Protocol):
    """One split of a dataset: an `ImageSet` (uint8 tensors in memory) or a `FolderSet` (image files).

    Samples are numbered 0..len-1 in the split's order; `labels[i]`, `inputs([i])` and the indices
    `indexed_batches` yields all mean sample i (compress caches a teacher's logits by that index)."""

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,) class indices, in sample order (an image folder's come from its file list, undecoded)."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one normalised sample."""

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int] | torch.Tensor | range) -> Split:
        """The samples at `indices`, in that order, renumbered from 0."""

    def inputs(self, indices: Sequence[int] | torch.Tensor | range) -> torch.Tensor:
        """The normalised, un-augmented float (N, C, H, W) of the samples at `indices` (the bench's timing inputs)."""

    def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, augment: bool = False,
                skip: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised float batches and their labels. With `seed`, shuffled per epoch (training); else in
        order, every sample exactly once across ranks (evaluation). `skip` leaves out the first batches."""

    def indexed_batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0, augment: bool = False,
                        skip: int = 0, rank: int = 0,
                        world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`batches`, each with the indices of its samples in this split."""

    def num_batches(self, batch_size: int, world: int = 1) -> int: ...


def sample_order(size: int, seed: int | None, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's sample indices: DistributedSampler's per-epoch shuffle (training, `seed` given), or
    every rank-th sample in order (evaluation: each sample exactly once across ranks)."""
    if seed is None:
        return list(range(rank, size, world))
    sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def batches_per_rank(size: int, batch_size: int, world: int) -> int:
    return -(-(-(-size // world)) // batch_size)  # ceil(ceil(size / world) / batch_size)


@dataclasses.dataclass
class Datasets:
    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.test.sample_shape
