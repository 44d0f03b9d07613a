"""The one image preprocessing: uint8 pixels -> the float tensor a model was trained on.

Training and evaluation (`ImageSet.normalise`, the image-folder transforms), the bench (which feeds the
test split through the same sets) and `one-pipeline predict` (image files, with the settings read back
from an exported model's metadata) all call `normalise`; a serving-side copy of it that drifts is the
classic silent accuracy loss. Files are decoded and brought to the model's mode by
`pipeline.training.images` (the same for training, bench and predict); image folders are resized and
centre-cropped by `folder_eval_resize`, and predict fits any other image with `Preprocessing.fit`.
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
        """Image folders' models see every image through the evaluation resize and crop (`folder_eval_resize`);
        the other datasets' were trained on whole pictures of one size, which an image of that size keeps."""
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
        """What the model takes, e.g. "28x28 grayscale"."""
        colour = {1: "grayscale", 3: "RGB"}.get(self.channels, f"{self.channels}-channel")
        return f"{self.width}x{self.height} {colour}"

    def fit(self, image: Any) -> tuple[torch.Tensor, list[str]]:
        """A decoded PIL image (`pipeline.training.images.open_image`) -> uint8 (C, H, W) the model takes, and
        what was done to it: converted (mode), rotated (EXIF), resized, centre-cropped."""
        import numpy as np

        from pipeline.training.images import ROTATED, to_channels

        steps = ["rotated (EXIF)"] if image.info.get(ROTATED) else []
        image, converted = to_channels(image, self.channels)
        steps += ["converted"] if converted else []
        image, resized = self._resize(image)
        steps += resized
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.reshape(self.height, self.width, self.channels).copy()).permute(2, 0, 1), steps

    def _resize(self, image: Any) -> tuple[Any, list[str]]:
        """Image folders: always their evaluation resize and crop (as training's validation saw them). The
        fixed-size datasets' images are whole pictures at one size: an off-size image is resized to cover
        that size, keeping its aspect, and its centre cut out."""
        from PIL import Image

        if self.resizes:
            from torchvision import transforms  # here: torchvision takes seconds to import, and only folders need it

            return transforms.Compose(folder_eval_resize(self.height))(image), ["resized", "centre-cropped"]
        (w, h), steps = image.size, []
        cover = max(self.width / w, self.height / h)
        scaled = (max(self.width, round(w * cover)), max(self.height, round(h * cover)))
        if scaled != (w, h):
            image = image.resize(scaled, Image.Resampling.BILINEAR)  # what torchvision's Resize does to a PIL image
            steps.append("resized")
        if image.size != (self.width, self.height):  # the centre, rounded as torchvision's CenterCrop does
            left, top = round((image.size[0] - self.width) / 2), round((image.size[1] - self.height) / 2)
            image = image.crop((left, top, left + self.width, top + self.height))
            steps.append("centre-cropped")
        return image, steps

    def pixels(self, image: Any) -> torch.Tensor:
        return self.fit(image)[0]

    def tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise(pixels, self.mean, self.std)
