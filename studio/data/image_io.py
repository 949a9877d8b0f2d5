"""Reading an image as it looks: the one function validation, training, captioning, thumbnails and the health check
use, so every part of Studio sees the same pixels.

- EXIF orientation is applied (a phone photo stored sideways is read upright, and its size is the displayed one);
- 16-bit and other high-bit-depth modes are scaled to 8 bits (Pillow's own conversion clips a 16-bit grey ramp to
  almost all white);
- transparency (RGBA, LA, P or grey/RGB with a transparent colour) is composited on one background colour;
- an image over the pixel limit is refused, naming the file, before it is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps

from studio.config import FIELDS
from studio.errors import StudioError

DEFAULT_MAX_PIXELS: int = FIELDS["max_image_pixels"].default
DEFAULT_BACKGROUND: str = FIELDS["image_background"].default

# Pillow's process-wide decompression-bomb check raises a traceback that does not name the file; every image Studio
# reads goes through this module, which checks each file against max_image_pixels before decoding it instead.
Image.MAX_IMAGE_PIXELS = None

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # PNG stores 16-bit grey as I;16 (older Pillow: I)
_ORIENTATION_TAG = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what Pillow raises for broken or truncated files


class ImageReadError(StudioError):
    """An image Studio cannot read; the message names the file and how to fix it."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


def read_image(path: str | Path, *, background: str = DEFAULT_BACKGROUND,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image as displayed, in mode RGB: upright, 8-bit, transparency on `background` (white, black, #rrggbb)."""
    path = Path(path)
    fill = _background_rgb(background)
    try:
        with Image.open(path) as img:
            _check_pixels(path, img.size, max_pixels)
            img.load()  # decodes fully: a truncated file fails here, not half-way through training
            ImageOps.exif_transpose(img, in_place=True)  # (no copy of an upright image)
            return _flatten(_to_8bit(img), fill)  # a new image: this one is closed on return
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def image_size(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the header; the pixels are not checked."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            _check_pixels(path, img.size, max_pixels)
            width, height = img.size
            return (height, width) if img.getexif().get(_ORIENTATION_TAG) in _TRANSPOSED else (width, height)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _background_rgb(background: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(background)[:3]
    except ValueError:
        raise StudioError(f"image_background is '{background}', which is not a colour. Use white, black or "
                          "#rrggbb.") from None


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageReadError(path, f"{path.name}: {width}x{height} px is {width * height / 1e6:.0f} megapixels, "
                                   f"over the limit of {max_pixels / 1e6:.0f} (max_image_pixels). Downscale it, or "
                                   "raise max_image_pixels if the machine has the memory to decode it.")


def _unreadable(path: Path, exc: Exception) -> ImageReadError:
    return ImageReadError(path, f"{path.name}: cannot be read as an image ({exc}). Re-export it as PNG or JPG, or "
                                "delete it.")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey (and 32-bit integer, which holds 16-bit data in PNG) to 0..255 by scale, float (0..1) likewise;
    other modes are 8-bit already (Pillow reads 16-bit RGB(A) PNGs as their high bytes)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        scaled = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
    elif img.mode == "F":
        scaled = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255.0
    else:
        return img
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L")


def _flatten(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    if "A" not in img.getbands() and "a" not in img.getbands() and img.info.get("transparency") is None:
        return img.convert("RGB")
    rgba = img.convert("RGBA")  # applies a palette's or a transparent colour's transparency too
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*fill, 255)), rgba).convert("RGB")
