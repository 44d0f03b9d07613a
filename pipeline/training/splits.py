"""What every dataset kind shares (the in-memory sets of `data`, the image files of `imagefolder`):
the split seed, the per-rank sample order and the `Datasets` bundle. Both import it; neither the other."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.utils.data import DistributedSampler

SPLIT_SEED = 0  # the validation split is the same whatever the training seed
Split = Any  # an ImageSet (in memory) or a FolderSet (image files): both have len, batches(), sample_shape


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
