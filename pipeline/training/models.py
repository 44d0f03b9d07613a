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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)

    def single(self) -> ModelSpec:
        return dataclasses.replace(self, method="single", branches=1)


class ONEOutput(NamedTuple):
    branches: torch.Tensor  # (batch, m, classes): each branch's logits
    gate: torch.Tensor  # (batch, m): gate weights, rows sum to 1
    teacher: torch.Tensor  # (batch, classes): gate-weighted sum of branch logits


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
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


def _stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [block(inplanes, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


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
        depth = CIFAR_DEPTHS[spec.arch]
        block = Bottleneck if spec.arch == "resnet110" else BasicBlock
        n = (depth - 2) // 6
        w = spec.width
        trunk = nn.Sequential(
            nn.Conv2d(spec.in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            _stage(block, w, w, n, 1),
            _stage(block, w * block.expansion, 2 * w, n, 2),
        )
        trunk_out = 2 * w * block.expansion
        def branch() -> Branch:
            return Branch(_stage(block, trunk_out, 4 * w, n, 2), 4 * w * block.expansion, spec.num_classes)
    elif spec.arch == "resnet18":
        trunk = nn.Sequential(
            nn.Conv2d(spec.in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            _stage(BasicBlock, 64, 64, 2, 1), _stage(BasicBlock, 64, 128, 2, 2), _stage(BasicBlock, 128, 256, 2, 2),
        )
        trunk_out = 256
        def branch() -> Branch:
            return Branch(_stage(BasicBlock, 256, 512, 2, 2), 512, spec.num_classes)
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
