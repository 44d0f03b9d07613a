"""Every image file the project decodes is opened by `open_image`: `one-pipeline predict`, the image-folder
check before training and the image-folder loader (so training, export's calibration and the bench too).
A file that cannot be used, whatever the reason (missing, a folder, empty, not an image, truncated, more
pixels than the bound), is one UsageError naming it, never a traceback from PIL.

`to_channels` then brings any mode to the model's grayscale or RGB, one way for every caller:

    image = open_image(Path("shoe.jpg"))           # decoded, EXIF orientation applied
    image, converted = to_channels(image, 3)       # RGB, from L, P, RGBA, I;16, CMYK, ...
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import UsageError

# PIL's own bound against decompression bombs (about 89.5 million pixels; PIL warns above it and refuses
# twice that). Read once here: the bound is enforced by `open_image`, never by changing PIL's setting.
PIL_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
ROTATED = "one_pipeline_exif_rotated"  # key of Image.info: the file's EXIF orientation was applied
MODE_NAMES = {"1": "1-bit", "L": "grayscale", "LA": "grayscale + alpha", "P": "palette", "PA": "palette + alpha",
              "RGB": "RGB", "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "LAB", "HSV": "HSV",
              "I": "32-bit grayscale", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
              "I;16L": "16-bit grayscale", "I;16N": "16-bit grayscale", "F": "float grayscale"}
# the files an image folder and `predict` take: torchvision's ImageFolder list (its IMG_EXTENSIONS)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I" (32-bit): how some TIFFs hold 16-bit data
# White, as viewers show a transparent image: the colour stored under a transparent pixel is arbitrary
# (black, white, leftovers of an edit), so dropping alpha (PIL's convert("RGB")) would feed the network
# backgrounds that differ between files that look the same.
BACKGROUND = (255, 255, 255)


def open_image(path: Path | str, max_pixels: int | None = None, *, draft: int | None = None,
               bound_name: str = "data.max_image_pixels") -> Image.Image:
    """The decoded image with its EXIF orientation applied, or a one-line UsageError naming the file.
    `max_pixels`: the most width x height accepted (None: PIL's bound); `bound_name`: the option that
    raises it, for the message. `draft`: JPEGs may decode at a reduced scale, down to this side (a check)."""
    path = Path(path)
    bound = PIL_MAX_PIXELS if max_pixels is None else max_pixels
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not an image file; pass the image files in it")
    try:
        with _pil_bound_off(), Image.open(path) as image:
            width, height = image.size
            if width * height > bound:
                raise UsageError(f"{path} is {width}x{height} = {width * height:,} pixels, more than the bound of "
                                 f"{bound:,} (a guard against decompression bombs); if you trust the file, raise "
                                 f"{bound_name}, else remove it")
            if draft:
                image.draft("RGB", (draft, draft))
            image.load()
            orientation = image.getexif().get(0x0112, 1)  # 1: as stored
            upright = ImageOps.exif_transpose(image)  # a copy, detached from the file
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; check the path") from None
    except PermissionError:
        raise UsageError(f"{path} cannot be read (permission denied); check its permissions") from None
    except UnidentifiedImageError:
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "is not an image PIL can read (another kind " \
                                                                      "of file)"
        raise UsageError(f"{path} {what}; remove it or pass a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # OSError: truncated data; SyntaxError: PIL's word for a damaged PNG chunk
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path} is damaged or truncated ({detail}); remove it or replace it with a good copy") \
            from None
    if orientation != 1:
        upright.info[ROTATED] = True
    return upright


@contextlib.contextmanager
def _pil_bound_off() -> Iterator[None]:
    """PIL checks its module-wide bound inside Image.open, before `open_image` sees the size; the bound a
    user raised must win, so PIL's check is off for this call alone and `open_image` applies the bound."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_channels(image: Image.Image, channels: int) -> tuple[Image.Image, bool]:
    """`image` in mode L (channels 1) or RGB (3), and whether its mode changed. 16-bit images are scaled to
    8 bits (x / 257: white stays white; PIL's convert would clip everything above 255 to white);
    transparent ones are composited onto BACKGROUND; palette, CMYK, YCbCr, ... converted by PIL."""
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image, False
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        backdrop = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(backdrop, image.convert("RGBA")).convert("RGB")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB" if image.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV") else "L")
    return (image if image.mode == target else image.convert(target)), True


def open_rgb(path: str, max_pixels: int | None = None) -> Image.Image:
    """The image-folder loader (torchvision's ImageFolder `loader`): `open_image`, then RGB."""
    return to_channels(open_image(path, max_pixels), 3)[0]


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def mode_name(mode: str) -> str:
    return MODE_NAMES.get(mode, f"mode {mode}")

