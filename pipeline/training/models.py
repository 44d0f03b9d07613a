"""ONE ResNets: a shared trunk, m branches and a gate; and the plain single-branch network.

Every network is described by a small `ModelSpec` (a dict of primitives) that checkpoints carry, so a
later stage rebuilds the model from the file alone:

    spec = ModelSpec(arch="resnet32", num_classes=100, in_channels=3, method="one", branches=3)
    model = build_model(spec)            # ONENet: forward(x) -> ONEOutput(branches, gate, teacher)
    single = build_model(spec.single())  # SingleNet: forward(x) -> logits; also the vanilla baseline

CIFAR ResNets follow the official ONE code: stem + stage 1 + stage 2 shared, stage 3 duplicated per
branch (own pool and classifier), gate on the pooled stage-2 output. Depth 6n+2 with basic blocks
(resnet20/32/44/56); `resnet110` is the bottleneck variant the paper reports (18 blocks per stage).
`resnet18` is the ImageNet variant: layer4 duplicated, gate on layer3's output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
ARCHS = (*CIFAR_DEPTHS, "resnet18")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_classes: int
    in_channels: int
    method: str = "one"  # "one": trunk + branches + gate; "single": one plain network
    branches: int = 3
    width: int = 16
    # A pruned network (the compress stage): each stage's residual width and each block's inner width
    # (its first conv's outputs), basic-block ResNets only; None: the widths `width` implies
    stage_widths: tuple[int, ...] | None = None
    block_widths: tuple[int, ...] | None = None
    # A depth-pruned network: residual blocks per stage (the first, which holds the downsample, always
    # stays); block_widths then has one entry per kept block. None: the architecture's own depth
    stage_blocks: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Primitives only; unset widths and depths are left out, so unpruned files keep the keys they always
        had (and files written before a field existed load with its default)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in _PRUNED_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        shapes = {k: tuple(data[k]) for k in _PRUNED_FIELDS if data.get(k) is not None}
        return cls(**{**data, **shapes})

    def single(self) -> ModelSpec:
        return dataclasses.replace(self, method="single", branches=1)


_PRUNED_FIELDS = ("stage_widths", "block_widths", "stage_blocks")


class ONEOutput(NamedTuple):
    branches: torch.Tensor  # (batch, m, classes): each branch's logits
    gate: torch.Tensor  # (batch, m): gate weights, rows sum to 1
    teacher: torch.Tensor  # (batch, classes): gate-weighted sum of branch logits


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, inner: int | None = None):
        super().__init__()
        inner = inner or planes
        self.conv1 = nn.Conv2d(inplanes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


def _stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int,
           inner: tuple[int, ...] | None = None) -> nn.Sequential:
    """`blocks` blocks, the first with the stride (and the downsample where the width changes)."""
    widths = [{"inner": w} for w in inner] if inner else [{}] * blocks  # inner: pruned basic blocks only
    layers = [block(inplanes, planes, stride, **widths[0])]
    layers += [block(planes * block.expansion, planes, **widths[i]) for i in range(1, blocks)]
    return nn.Sequential(*layers)


def stage_layout(spec: ModelSpec) -> tuple[tuple[int, ...], int]:
    """(residual width of each stage, blocks per stage) of the unpruned architecture."""
    if spec.arch in CIFAR_DEPTHS:
        w = spec.width
        return (w, 2 * w, 4 * w), (CIFAR_DEPTHS[spec.arch] - 2) // 6
    return (64, 128, 256, 512), 2


def stage_depths(spec: ModelSpec) -> tuple[int, ...]:
    """Blocks per stage of this network: the spec's (depth-pruned) or the architecture's."""
    stages, blocks = stage_layout(spec)
    return spec.stage_blocks or (blocks,) * len(stages)


def _shape(spec: ModelSpec) -> tuple[tuple[int, ...], list[tuple[int, ...] | None], tuple[int, ...]]:
    """Each stage's residual width, its blocks' inner widths (None: equal to the residual width) and its
    number of blocks."""
    stages, blocks = stage_layout(spec)
    depth = stage_depths(spec)
    if spec.stage_blocks is not None and (spec.arch == "resnet110" or len(depth) != len(stages)
                                          or not all(1 <= b <= blocks for b in depth)):
        raise ValueError(f"stage_blocks {spec.stage_blocks} do not fit {spec.arch} ({blocks} blocks per stage)")
    if spec.stage_widths is None:
        return stages, [None] * len(stages), depth
    if spec.arch == "resnet110" or len(spec.stage_widths) != len(stages) or \
            len(spec.block_widths or ()) != sum(depth):
        raise ValueError(f"widths {spec.stage_widths} / {spec.block_widths} do not fit {spec.arch}")
    starts = [sum(depth[:s]) for s in range(len(stages))]
    inner = [tuple(spec.block_widths[start:start + n]) for start, n in zip(starts, depth)]
    return spec.stage_widths, inner, depth


class Branch(nn.Module):
    """The duplicated last stage with its own global pool and classifier."""

    def __init__(self, stage: nn.Sequential, features: int, num_classes: int):
        super().__init__()
        self.stage = stage
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stage(x), 1), 1))


class Gate(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> softmax on the pooled trunk output (official ONE)."""

    def __init__(self, features: int, branches: int):
        super().__init__()
        self.fc = nn.Linear(features, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(trunk, 1), 1)
        return F.softmax(F.relu(self.bn(self.fc(pooled))), dim=1)


def _parts(spec: ModelSpec) -> tuple[nn.Module, int, Callable[[], Branch]]:
    """The trunk, its output channels, and a factory for one branch."""
    if spec.arch in CIFAR_DEPTHS:
        block = Bottleneck if spec.arch == "resnet110" else BasicBlock
        (w1, w2, w3), (i1, i2, i3), (n1, n2, n3) = _shape(spec)
        x = block.expansion
        trunk = nn.Sequential(
            nn.Conv2d(spec.in_channels, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            _stage(block, w1, w1, n1, 1, i1),
            _stage(block, w1 * x, w2, n2, 2, i2),
        )
        trunk_out = w2 * x
        def branch() -> Branch:
            return Branch(_stage(block, trunk_out, w3, n3, 2, i3), w3 * x, spec.num_classes)
    elif spec.arch == "resnet18":
        (w1, w2, w3, w4), (i1, i2, i3, i4), (n1, n2, n3, n4) = _shape(spec)
        trunk = nn.Sequential(
            nn.Conv2d(spec.in_channels, w1, 7, 2, 3, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            _stage(BasicBlock, w1, w1, n1, 1, i1), _stage(BasicBlock, w1, w2, n2, 2, i2),
            _stage(BasicBlock, w2, w3, n3, 2, i3),
        )
        trunk_out = w3
        def branch() -> Branch:
            return Branch(_stage(BasicBlock, w3, w4, n4, 2, i4), w4, spec.num_classes)
    else:
        raise ValueError(f"unknown architecture {spec.arch!r}; choose one of {', '.join(ARCHS)}")
    return trunk, trunk_out, branch


def _init(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit BatchNorm; Linear keeps PyTorch's default (official ONE)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ONENet(nn.Module):
    """Shared trunk, m branches and a gate; the gated sum of branch logits is the teacher (ONE-E)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.trunk, trunk_out, make_branch = _parts(spec)
        self.branches = nn.ModuleList(make_branch() for _ in range(spec.branches))
        self.gate = Gate(trunk_out, spec.branches)
        _init(self)

    def forward(self, x: torch.Tensor) -> ONEOutput:
        shared = self.trunk(x)
        logits = torch.stack([branch(shared) for branch in self.branches], dim=1)
        gate = self.gate(shared)
        teacher = (gate.unsqueeze(-1) * logits).sum(dim=1)
        return ONEOutput(logits, gate, teacher)


class SingleNet(nn.Module):
    """One plain network: trunk + one branch. The vanilla baseline and the stripped ONE branch."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.trunk, _, make_branch = _parts(spec)
        self.branch = make_branch()
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.trunk(x))


class EnsembleNet(nn.Module):
    """The full ONE model answering with its gated ensemble's logits (ONE-E) only: one output, like the
    stripped branch, so that both are exported, timed and evaluated the same way."""

    def __init__(self, full: ONENet):
        super().__init__()
        self.full, self.spec = full, full.spec.single()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.full(x).teacher


def build_model(spec: ModelSpec) -> nn.Module:
    return ONENet(spec) if spec.method == "one" else SingleNet(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
