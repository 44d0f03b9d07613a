"""The one image preprocessing: uint8 pixels -> the float tensor a model was trained on.

Training and evaluation (`ImageSet.normalise`, the image-folder transforms), the bench (which feeds the
test split through `ImageSet`) and `one-pipeline predict` (an image file, with the settings read back
from an exported model's metadata) all call `normalise`; a serving-side copy of it that drifts is the
classic silent accuracy loss. Image folders are also resized and centre-cropped, by `folder_eval_resize`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import torch


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) or (C, H, W) in 0..255 -> float32 (x / 255 - mean) / std per channel."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


class Normalise:
    """`normalise` as a torchvision transform step on a uint8 tensor (picklable, for DataLoader workers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return normalise(image, self.mean, self.std)


def folder_eval_resize(size: int) -> list:
    """Image folders at evaluation: shorter side to size * 256 / 224, then the centre size x size crop."""
    from torchvision import transforms

    return [transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size)]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What a model expects, as the export stage writes it into the ONNX metadata."""

    dataset: str
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def resizes(self) -> bool:
        """Image folders take any image size (resized and cropped); the other datasets one exact size."""
        return self.dataset == "imagefolder"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Preprocessing:
        """From an exported model's metadata_props; KeyError/ValueError/TypeError when a key is missing or bad."""
        channels, height, width = (int(v) for v in json.loads(meta["input_shape"]))
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
        if not (len(mean) == len(std) == channels):
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels} channels")
        return cls(meta["dataset"], channels, height, width, tuple(map(float, mean)), tuple(map(float, std)))

    def describe(self) -> str:
        colour = {1: "grayscale", 3: "RGB"}.get(self.channels, f"{self.channels}-channel")
        size = f"any size (resized, centre-cropped to {self.width}x{self.height})" if self.resizes else \
            f"{self.width}x{self.height}"
        return f"{size} {colour} images"

    def pixels(self, image: Any) -> torch.Tensor:
        """A decoded PIL image -> uint8 (C, H, W), or ValueError saying what does not fit and how to fix it."""
        import numpy as np

        if self.resizes:  # as torchvision's ImageFolder loads them: RGB, then the eval resize and crop
            from torchvision import transforms

            image = transforms.Compose(folder_eval_resize(self.height))(image.convert("RGB"))
        channels = {"L": 1, "RGB": 3}.get(image.mode)
        fixes = []
        if image.size != (self.width, self.height):
            fixes.append(f"resize it to {self.width}x{self.height}")
        if channels != self.channels:
            fixes.append("convert it to grayscale (mode L)" if self.channels == 1 else "convert it to RGB")
        if fixes:
            mode = f"{channels}-channel" if channels else f"mode {image.mode}"
            raise ValueError(f"is {image.size[0]}x{image.size[1]} {mode}; the model takes {self.describe()}: "
                             f"{' and '.join(fixes)}")
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.reshape(self.height, self.width, self.channels).copy()).permute(2, 0, 1)

    def tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise(pixels, self.mean, self.std)
