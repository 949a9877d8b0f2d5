"""Image datasets: validation (all problems at once), caption augmentation, aspect-ratio buckets, pixel loading.

A dataset is a folder of images with captions in `metadata.csv` or `.txt` sidecars (studio.data.captions).
Training never starts on a dataset with problems, so it never dies on one half-way.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.data.captions import (IMAGE_SUFFIXES, UNSUPPORTED_SUFFIXES, conflicting_captions, list_images,
                                  metadata_path_for, read_caption_rows)
from studio.data.dataset_files import CAPTION, DELETE_FILE, REMOVE_ROW
from studio.data.image_io import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, ImageReadError, read_image
from studio.errors import StudioError

MIN_SIDE = 64


class DatasetError(StudioError):
    """A dataset with problems; the message lists every one."""


@dataclass
class DatasetItem:
    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) as displayed


@dataclass(frozen=True)
class DatasetIssue:
    message: str  # what is wrong and how to fix it, naming the file
    file: str = ""  # the file (or caption row) it is about; "" for the dataset as a whole
    fix: str | None = None  # REMOVE_ROW, DELETE_FILE or CAPTION (studio.data.dataset_files.apply_fix)


@dataclass
class DatasetReport:
    items: list[DatasetItem] = field(default_factory=list)
    issues: list[DatasetIssue] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [issue.message for issue in self.issues]

    @property
    def ok(self) -> bool:
        return not self.issues

    def add(self, message: str, file: str = "", fix: str | None = None) -> None:
        self.issues.append(DatasetIssue(message, file, fix))

    def raise_if_problems(self) -> None:
        if self.issues:
            listing = "\n".join(f"  - {p}" for p in self.problems)
            raise DatasetError(f"The dataset has {len(self.issues)} problem(s); fix them and start again:\n{listing}")


def inspect_dataset(folder: str | Path, metadata_path: str | Path | None = None, min_side: int = MIN_SIDE, *,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> DatasetReport:
    """Check every image and caption; return the usable items and every problem with its fix."""
    folder = Path(folder)
    report = DatasetReport()
    if not folder.is_dir():
        report.add(f"Dataset folder {folder} does not exist. Create it and put your images in it.")
        return report
    try:
        rows = read_caption_rows(folder, metadata_path)
    except StudioError as exc:
        report.add(str(exc))
        return report
    captions, conflicts = dict(rows), conflicting_captions(rows)
    csv_path = metadata_path_for(folder, metadata_path)
    source = csv_path.name if csv_path.is_file() else "a .txt caption file"

    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in UNSUPPORTED_SUFFIXES:
            report.add(f"{path.name}: {path.suffix} images are not supported. Convert it to PNG or JPG (or delete "
                       "it).", path.name, DELETE_FILE)
    images = list_images(folder)
    names = {p.name for p in images}
    for name in sorted(set(captions) - names):
        report.add(f"{name}: listed in {source} but there is no such image in {folder}. Add the image or remove "
                   "its row.", name, REMOVE_ROW)
    for path in images:
        size, problem = _check_image(path, min_side, max_pixels)
        caption = captions.get(path.name)
        if problem:  # before the caption: an unreadable image needs deleting, not captioning
            report.add(problem, path.name, DELETE_FILE)
        elif caption is None:
            report.add(f"{path.name}: no caption. Add a row to {csv_path.name}, a {path.stem}.txt file, or run "
                       "Auto-label.", path.name, CAPTION)
        elif not caption:
            report.add(f"{path.name}: the caption is empty. Write one or run Auto-label.", path.name, CAPTION)
        elif path.name in conflicts:
            listing = " / ".join(repr(c) for c in conflicts[path.name])
            report.add(f"{path.name}: {len(conflicts[path.name])} rows of {source} give it different captions "
                       f"({listing}). Keep one caption.", path.name, CAPTION)
        else:
            report.items.append(DatasetItem(path, caption, size))
    if not images and not report.issues:
        report.add(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}). Add some.")
    return report


def _check_image(path: Path, min_side: int, max_pixels: int) -> tuple[tuple[int, int], str | None]:
    try:
        size = read_image(path, max_pixels=max_pixels).size  # as training will read it
    except ImageReadError as exc:
        return (0, 0), str(exc)
    if min(size) < min_side:
        return size, (f"{path.name}: {size[0]}x{size[1]} px is too small (at least {min_side} px a side). "
                      "Use a larger image or delete it.")
    return size, None


# --- captions ------------------------------------------------------------------------------------------------------

def augment_caption(caption: str, rng: random.Random, *, trigger_word: str = "", shuffle_tags: bool = False,
                    keep_tokens: int = 0, caption_dropout: float = 0.0) -> str:
    """The caption a training step sees: maybe dropped, tags maybe shuffled (keeping the first N), trigger first."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if trigger_word:
        tags = [trigger_word] + [t for t in tags if t != trigger_word]
    if shuffle_tags:
        keep = keep_tokens + (1 if trigger_word and keep_tokens == 0 else 0)
        head, tail = tags[:keep], tags[keep:]
        rng.shuffle(tail)
        tags = head + tail
    return ", ".join(tags)


# --- aspect-ratio buckets --------------------------------------------------------------------------------------------

def make_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with area <= resolution², from 1:4 to 4:1 (kohya's scheme)."""
    area = resolution * resolution
    low, high = max(step, (resolution // 2) // step * step), resolution * 2
    buckets = {(resolution // step * step,) * 2}
    for width in range(low, high + 1, step):
        height = min(high, (area // width) // step * step)
        if height >= low and 0.25 <= width / height <= 4:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space), larger area on ties."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image covers the bucket, then centre-crop; returns the image and the crop's (top, left)."""
    width, height = bucket
    scale = max(width / img.width, height / img.height)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height)), (top, left)


def load_pixels(path: Path, bucket: tuple[int, int], flip: bool = False, *, background: str = DEFAULT_BACKGROUND,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image as displayed (studio.data.image_io), as a (3, H, W) tensor in [-1, 1] fitted to `bucket`, and the
    crop's (top, left)."""
    fitted, crop = fit_to_bucket(read_image(path, background=background, max_pixels=max_pixels), bucket)
    if flip:
        fitted = fitted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), crop


def bucket_batches(buckets_of: list[tuple[int, int]], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of sample indices; every batch holds one bucket size. Pure in (inputs, seed)."""
    rng = random.Random(seed)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets_of):
        groups.setdefault(bucket, []).append(index)
    batches = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches
