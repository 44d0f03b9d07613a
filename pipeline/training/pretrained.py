"""Pretrained starts (model.pretrained): a torchvision-format ResNet-18 state dict into our resnet18.

torchvision's names map onto ours (pipeline/training/models.py): conv1, bn1 and layer1-3 are the trunk
(`trunk.0`, `trunk.1`, `trunk.4`-`trunk.6`); layer4 is every branch's own copy of the last stage
(`branches.<i>.stage`, or `branch.stage` for a single network); `fc` and the gate stay fresh, for the
user's classes. A one-channel network gets the file's RGB conv1 filters summed over their three
channels (the grey image is R = G = B, so the sum answers it as the colour filters would; timm does the same).

    start_from(model, "resnet18.pth", branch_noise=0.1)   # or "ResNet18_Weights.IMAGENET1K_V1" (online)

The branches' copies of layer4 would all start identical; `branch_noise` adds to each copy's conv weights
Gaussian noise of that share of the tensor's std, so the branches start apart (docs/PRETRAINED.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UsageError

DEFAULT_BRANCH_NOISE = 0.1  # the measured choice (docs/PRETRAINED.md), when model.pretrained_branch_noise is None
_TRUNK = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}  # our trunk index -> torchvision


def start_from(model: nn.Module, source: str, branch_noise: float = DEFAULT_BRANCH_NOISE) -> None:
    """Load `source` (a path or a torchvision weights name) into the trunk and every branch of `model`."""
    state = read_state(source)
    ours = model.state_dict()
    loaded = {key: _fitted(source, tv_key, state, ours[key]) for key, tv_key in _torchvision_names(ours).items()}
    expected = set(_torchvision_names(ours).values())
    extra = [k for k in state if k not in expected and not k.startswith("fc.")]
    if extra:
        raise UsageError(f"model.pretrained {source}: {extra[0]} is not a weight of this ResNet-18 "
                         "(give a torchvision resnet18 state dict)")
    model.load_state_dict(loaded, strict=False)
    if branch_noise:
        perturb_branches(model, branch_noise)


def torchvision_name(key: str) -> str | None:
    """torchvision's name of one of our resnet18 state-dict keys; None: fresh (classifier, gate)."""
    part, _, rest = key.partition(".")
    if part == "trunk":
        index, _, rest = rest.partition(".")
        return f"{_TRUNK[index]}.{rest}"
    if part == "branches":
        rest = rest.partition(".")[2]
    elif part != "branch":
        return None
    stage, _, rest = rest.partition(".")
    return f"layer4.{rest}" if stage == "stage" else None


def read_state(source: str) -> dict[str, torch.Tensor]:
    path = Path(source).expanduser()
    if not path.exists() and "_Weights." in source:
        return _download(source)
    if not path.is_file():
        raise UsageError(f"model.pretrained {source} is not a file (give a torchvision ResNet-18 state dict, "
                         "e.g. torch.save(torchvision.models.resnet18(weights=...).state_dict(), 'resnet18.pth'))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle, zip and unpickler refusals all mean "not a state dict"
        raise UsageError(f"model.pretrained {source} is not a PyTorch state dict: "
                         f"{str(error).strip().splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"model.pretrained {source} holds no state dict of tensors (save model.state_dict())")
    return state


def perturb_branches(model: nn.Module, share: float) -> None:
    """Each branch's copy of the last stage gets its own noise (from the seeded global generator)."""
    for branch in getattr(model, "branches", ()):
        for module in branch.stage.modules():
            if isinstance(module, nn.Conv2d):
                with torch.no_grad():
                    weight = module.weight
                    weight.add_(torch.randn_like(weight) * (share * weight.std()))


def _torchvision_names(ours: dict[str, torch.Tensor]) -> dict[str, str]:
    return {key: name for key in ours if (name := torchvision_name(key)) is not None}


def _fitted(source: str, tv_key: str, state: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    if tv_key not in state:
        raise UsageError(f"model.pretrained {source} has no {tv_key} (not a torchvision ResNet-18 state dict)")
    tensor = state[tv_key]
    if tv_key == "conv1.weight" and tensor.dim() == 4 and target.dim() == 4 and tensor.shape[1] == 3 \
            and target.shape[1] == 1:
        tensor = tensor.sum(dim=1, keepdim=True)  # RGB filters for grey input (see the module docstring)
    if tensor.shape != target.shape:
        raise UsageError(f"model.pretrained {source}: {tv_key} has shape {tuple(tensor.shape)} in the file but "
                         f"{tuple(target.shape)} in the network (a ResNet-18 of another width or input channels?)")
    return tensor.to(target.dtype)


def _download(name: str) -> dict[str, torch.Tensor]:
    """A torchvision weights name, fetched (and cached) by torchvision."""
    from torchvision.models import get_weight  # only here: a file start needs no torchvision import

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise UsageError(f"model.pretrained {name} is neither a file nor a torchvision weights name "
                         "(e.g. ResNet18_Weights.IMAGENET1K_V1)") from None
    if not name.startswith("ResNet18_"):
        raise UsageError(f"model.pretrained {name} is not ResNet-18 weights; use ResNet18_Weights.IMAGENET1K_V1")
    try:
        return weights.get_state_dict(progress=False)
    except OSError as error:  # URLError is an OSError: offline, or the server refused
        raise UsageError(f"cannot download {name} ({error}); download {weights.url} and set model.pretrained "
                         "to the file's path") from None
