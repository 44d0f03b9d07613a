"""A generated ImageFolder of the files users really have: 3 classes with uneven counts, small images of
every common mode (grayscale, RGB, RGBA, palette, 16-bit, CMYK JPEG, EXIF-rotated JPEG)."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from pipeline.training import data
from pipeline.training.splits import Split

CLASSES = ("apple", "banana", "cherry")
COUNTS = {"train": (16, 11, 7), "test": (4, 3, 2)}  # uneven on purpose
COLOURS = ((200, 40, 40), (230, 210, 60), (110, 20, 60))
MODES = ("L", "RGB", "RGBA", "P", "I;16", "CMYK", "EXIF", "RGB-JPEG")


def picture(cls: int, index: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3), 12-20 px a side, not square: the class's colour, a bar whose place tells the class, noise."""
    h, w = int(rng.integers(12, 21)), int(rng.integers(12, 21))
    pixels = np.empty((h, w, 3), dtype=np.float64)
    pixels[:] = COLOURS[cls]
    pixels[:, (cls * w) // 3:((cls + 1) * w) // 3] = 255 - np.array(COLOURS[cls])
    pixels += rng.normal(0, 20, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def save(array: np.ndarray, mode: str, folder: Path, stem: str) -> Path:
    """One file of `mode` (see MODES) from RGB pixels."""
    rgb = Image.fromarray(array)
    if mode == "L":
        path, image = folder / f"{stem}.png", rgb.convert("L")
    elif mode == "RGBA":
        alpha = np.full(array.shape[:2], 255, dtype=np.uint8)
        alpha[:2] = 0  # a transparent band
        path, image = folder / f"{stem}.png", Image.fromarray(np.dstack([array, alpha]), "RGBA")
    elif mode == "P":
        path, image = folder / f"{stem}.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode == "I;16":
        wide = np.asarray(rgb.convert("L")).astype(np.uint16) * 257  # the full 16-bit range
        path, image = folder / f"{stem}.png", Image.fromarray(wide)
    elif mode == "CMYK":
        path, image = folder / f"{stem}.jpg", rgb.convert("CMYK")
    else:
        path, image = folder / f"{stem}.jpg", rgb
    if mode == "EXIF":  # stored on its side: viewers (and the loader) turn it upright
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    else:
        image.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def write_own_images(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    made = 0
    for split, counts in COUNTS.items():
        for cls, (name, count) in enumerate(zip(CLASSES, counts)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                save(picture(cls, i, rng), MODES[made % len(MODES)], folder, f"{name}_{i:02d}")
                made += 1
    return root


class InterfaceOnly:
    """A split that answers only what the `Split` interface declares (pipeline/training/splits.py): a stage
    that reaches past it (`.images`, a FolderSet's files, ...) fails the test instead of one kind of data."""

    MEMBERS = frozenset(name for name in vars(Split) if not name.startswith("_"))

    def __init__(self, split):
        self._split = split

    def __len__(self) -> int:
        return len(self._split)

    def __getattr__(self, name: str):
        if name not in self.MEMBERS:
            raise AssertionError(f"a stage used {name!r} of a split, which the Split interface lacks")
        value = getattr(self._split, name)
        return (lambda indices: InterfaceOnly(value(indices))) if name == "subset" else value


@contextlib.contextmanager
def interface_only() -> Iterator[None]:
    """Within: every image-folder split `load_datasets` returns is an `InterfaceOnly`."""
    real = data.load_imagefolder

    def wrapped(cfg, normalisation):
        sets = real(cfg, normalisation)
        sets.train, sets.val, sets.test = (InterfaceOnly(s) for s in (sets.train, sets.val, sets.test))
        return sets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "load_imagefolder", wrapped)
        yield


def write_bomb(path: Path, side: int = 30000) -> Path:
    """A decompression bomb: a valid 1-bit grayscale PNG of side x side pixels (900 million by default), about
    110 KB on disk, that would decode to 900 MB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    rows = b"\0" * ((-(-side // 8) + 1) * 1000)  # filter byte + side bits, a thousand rows at a time
    body = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path
