"""Thumbnails of a dataset's images as training reads them (studio.data.image_io: upright, 8-bit, transparency on
the background), kept in a cache folder so an image is decoded once, not every time it is shown. The folder is the
caller's (the studio keeps them in workspace/.cache), never the dataset's: showing a dataset does not change it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from studio.data.image_io import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, ImageReadError, read_image
from studio.fileio import atomic_path

EDGE = 512  # the longer side, in pixels: sharp in the gallery's enlarged view, ~50 KB as JPEG


def thumbnails(images: list[Path], folder: Path, *, background: str = DEFAULT_BACKGROUND,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Path]:
    """Image name → its thumbnail file in `folder` (one folder per dataset), for every readable image; made when
    missing or when the image changed, and the other thumbnails in `folder` are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for image in images:
        target = folder / f"{_key(image, background)}.jpg"
        try:
            if not target.is_file():
                _write(image, target, background, max_pixels)
        except ImageReadError:
            continue  # the validation report names it
        made[image.name] = target
    for stale in set(folder.glob("*.jpg")) - set(made.values()):  # (not another session's .tmp being written)
        stale.unlink()
    return made


def _key(image: Path, background: str) -> str:
    """Changes with the file (name, size, modification time), the background and the thumbnail size."""
    stat = image.stat()
    return hashlib.sha1(f"{image.name}|{stat.st_size}|{stat.st_mtime_ns}|{background}|{EDGE}".encode()).hexdigest()


def _write(image: Path, target: Path, background: str, max_pixels: int) -> None:
    picture = read_image(image, background=background, max_pixels=max_pixels)
    picture.thumbnail((EDGE, EDGE))
    with atomic_path(target) as tmp:
        picture.save(tmp, format="JPEG", quality=90)
