"""The dataset health check: what is worth a look before training, beyond what training refuses.

Blocking are only the problems training itself refuses (studio.data.images.inspect_dataset). Everything else is a
warning: near-duplicate images (perceptual hash), blurry ones (variance of the Laplacian at the size training sees)
and ones smaller than their bucket; caption coverage and length, tag frequencies and the trigger word; the bucket
distribution with how much each bucket crops; and the steps and time the run would take. Every image is read as it
looks (studio.data.image_io), so a phone photo with EXIF rotation is bucketed by its displayed size.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import imagehash
import numpy as np
from PIL import Image

from studio.config import RunConfig
from studio.data.captions import list_images, read_captions
from studio.data.image_io import ImageReadError, read_image
from studio.data.images import inspect_dataset, make_buckets, pick_bucket
from studio.data.tag_editor import split_tags, tag_counts
from studio.data.held_out import split_held_out
from studio.errors import StudioError
from studio.families import Family, get_family, resolve_family
from studio.fileio import atomic_path
from studio.plan.speed import duration_text, known_speed, run_signature

# Variance of the Laplacian (8-bit grey) under which an image looks blurry: the usual starting point. Sharp photos
# score in the hundreds to thousands; a 1-2 px Gaussian blur at 512 px takes them below it.
BLUR_THRESHOLD = 100.0
# Perceptual hash (imagehash's phash: DCT of the grey image, HASH_SIDE² = 64 bits) and the bits two images may differ
# in and still count as near-duplicates. Measured: a half-size JPEG re-encode or a 5-10 % brighter copy differs in
# 0-2 bits, a 5 % crop in 2-6; the demo's purple circles at other sizes and places in 2-4; two different diagrams of
# one document in 10; unrelated pictures in ~32 (fewest of 780 random pairs: 20). Larger hashes were less stable:
# 256 bits put a re-encoded copy of a flat-coloured picture 14-22 bits away.
HASH_SIDE = 8
DUPLICATE_BITS = 4
LOW_RES_FACTOR = 1.1  # enlarged by more than this to fill its bucket: below the training resolution
THUMBNAIL_SIDE = 256
Progress = Callable[[int, int], None]  # (images done, total)


@dataclass
class CheckedImage:
    path: Path
    size: tuple[int, int]  # (width, height) as displayed
    bucket: tuple[int, int]
    upscale: float  # > 1: enlarged this much to cover its bucket
    crop: float  # share of the resized image the bucket's centre crop cuts off
    sharpness: float  # variance of the Laplacian at the size training sees
    phash: np.ndarray  # the perceptual hash's HASH_SIDE² bits, packed into bytes
    thumbnail: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Duplicate:
    first: CheckedImage
    second: CheckedImage
    bits: int  # perceptual-hash bits (of HASH_SIDE²) that differ


@dataclass
class HealthReport:
    folder: Path
    cfg: RunConfig
    configured: bool  # False: the schema's default settings, no config given
    problems: list[str]  # what training refuses: blocking
    images: list[CheckedImage]  # every image the check could read
    training: list[CheckedImage]  # those training would use (captioned, readable, not held out)
    captions: dict[str, str]  # image name → caption, for the images present
    duplicates: list[Duplicate] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)  # read errors training did not already report
    steps: int | None = None
    time: str = "unknown"

    @property
    def blocking(self) -> bool:
        return bool(self.problems)

    @property
    def blurry(self) -> list[CheckedImage]:
        return sorted((f for f in self.images if f.sharpness < BLUR_THRESHOLD), key=lambda f: f.sharpness)

    @property
    def low_res(self) -> list[CheckedImage]:
        return sorted((f for f in self.images if f.upscale > LOW_RES_FACTOR), key=lambda f: -f.upscale)

    @property
    def warning_count(self) -> int:
        return len(self.duplicates) + len(self.blurry) + len(self.low_res) + len(self.unread)

    def bucket_rows(self) -> list[tuple[tuple[int, int], int, float, float]]:
        """(bucket, images, mean crop, largest crop) for the training images, most used bucket first."""
        groups: dict[tuple[int, int], list[float]] = {}
        for facts in self.training:
            groups.setdefault(facts.bucket, []).append(facts.crop)
        return sorted(((b, len(c), sum(c) / len(c), max(c)) for b, c in groups.items()), key=lambda r: (-r[1], r[0]))

    def tag_frequencies(self) -> list[tuple[str, int]]:
        return sorted(tag_counts(self.captions.values()).items(), key=lambda item: (-item[1], item[0]))


def check_dataset(folder: str | Path, cfg: RunConfig | None = None, *, family: str | None = None,
                  runs_dir: Path | None = None, device: str | None = None, thumbnails: Path | None = None,
                  progress: Progress | None = None) -> HealthReport:
    """Check the image dataset in `folder` for a run with `cfg` (default: the schema's defaults).

    `family`: the run's (default: resolved from cfg); `runs_dir` and `device` (the card's name): where earlier runs
    measured their speed, for the time estimate; `thumbnails`: a folder to write a small copy of each image into.
    """
    folder = Path(folder)
    configured = cfg is not None
    cfg = cfg or RunConfig(train_data_dir=str(folder))
    if not cfg.is_image:
        raise StudioError(f"The health check is for image datasets, and this config trains a {cfg.task_type} "
                          "model. Text datasets are validated by train.py and the Dataset tab.")
    record = get_family(family) if family else resolve_family(cfg)
    inspected = inspect_dataset(folder, cfg.metadata_path, max_pixels=cfg.max_image_pixels)
    report = HealthReport(folder, cfg, configured, list(inspected.problems), [], [], _captions(folder, cfg))
    buckets = _buckets(cfg, record)
    paths = list_images(folder) if folder.is_dir() else []
    for done, path in enumerate(paths, start=1):
        try:
            report.images.append(_check_image(path, cfg, buckets, thumbnails))
        except ImageReadError as exc:
            if str(exc) not in report.problems:  # else training reports it already
                report.unread.append(str(exc))
        if progress:
            progress(done, len(paths))
    usable = {item.path.name for item in inspected.items}
    report.training = _without_held_out(cfg, [f for f in report.images if f.name in usable])
    report.duplicates = find_duplicates(report.images)
    report.steps = training_steps(cfg, [f.bucket for f in report.training])
    report.time = _time_text(cfg, record.name, report.steps, runs_dir, device)
    return report


def _captions(folder: Path, cfg: RunConfig) -> dict[str, str]:
    """The captions of the images present; a broken metadata.csv is already one of the problems."""
    if not folder.is_dir():
        return {}
    try:
        captions = read_captions(folder, cfg.metadata_path)
    except StudioError:
        return {}
    return {p.name: captions[p.name] for p in list_images(folder) if p.name in captions}


def _time_text(cfg: RunConfig, family: str, steps: int | None, runs_dir: Path | None, device: str | None) -> str:
    """'about 1 h 20 min (at the speed of run X)', or why it is unknown: never a guess."""
    if not steps:
        return "unknown (no training images yet)"
    if runs_dir is None or device is None:
        return "unknown (no config chosen)"
    speed = known_speed(runs_dir, run_signature(cfg, family, device))
    if speed is None:
        return "unknown (no earlier run of this model size and batch on this device to measure the speed from)"
    seconds = steps * cfg.batch_size * cfg.gradient_accumulation_steps * speed.seconds_per_sample
    return f"about {duration_text(seconds)} (at the speed of run {speed.run})"


# --- one image -------------------------------------------------------------------------------------------------------

def _check_image(path: Path, cfg: RunConfig, buckets: list[tuple[int, int]],
                 thumbnails: Path | None) -> CheckedImage:
    img = read_image(path, background=cfg.image_background, max_pixels=cfg.max_image_pixels)
    bucket = pick_bucket(img.size, buckets)
    cover = max(bucket[0] / img.width, bucket[1] / img.height)  # the scale fit_to_bucket resizes by
    covered = (img.width * cover) * (img.height * cover)
    # Sharpness at the size training sees; a smaller image is measured as it is (it is reported as low-res).
    grey = img.convert("L")
    if cover < 1:
        grey = grey.resize((max(1, round(img.width * cover)), max(1, round(img.height * cover))),
                           Image.Resampling.LANCZOS)
    facts = CheckedImage(path, img.size, bucket, upscale=cover, crop=1 - bucket[0] * bucket[1] / covered,
                       sharpness=laplacian_variance(grey),
                       phash=np.packbits(imagehash.phash(grey, hash_size=HASH_SIDE).hash))
    if thumbnails is not None:
        # named by a hash: an image's own name may be as long as the file system allows, with no room for '.jpg'
        facts.thumbnail = _write_thumbnail(img, thumbnails / f"{hashlib.sha1(path.name.encode()).hexdigest()}.jpg")
    return facts


def laplacian_variance(grey: Image.Image) -> float:
    """Variance of the 3x3 Laplacian of a grey image: low when there are no sharp edges."""
    g = np.asarray(grey, dtype=np.float32)
    if min(g.shape) < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def _write_thumbnail(img: Image.Image, target: Path) -> Path:
    small = img.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    with atomic_path(target) as tmp:
        small.save(tmp, format="JPEG", quality=85)
    return target


# --- the dataset -----------------------------------------------------------------------------------------------------

def find_duplicates(images: list[CheckedImage], max_bits: int = DUPLICATE_BITS) -> list[Duplicate]:
    """Pairs whose perceptual hashes differ in at most `max_bits` bits, closest first."""
    hashes = np.stack([f.phash for f in images]) if images else np.zeros((0, 0), np.uint8)
    pairs = []
    for i in range(len(images) - 1):
        bits = np.bitwise_count(hashes[i] ^ hashes[i + 1:]).sum(axis=1)
        pairs += [Duplicate(images[i], images[i + 1 + j], int(bits[j])) for j in np.flatnonzero(bits <= max_bits)]
    return sorted(pairs, key=lambda d: (d.bits, d.first.name, d.second.name))


def _buckets(cfg: RunConfig, family: Family) -> list[tuple[int, int]]:
    """The buckets training makes for this config (as studio.engines.diffusion does, with the family's step)."""
    step = bucket_step(cfg, family)
    side = max(step, cfg.resolution // step * step)
    return make_buckets(side, step) if cfg.enable_bucket else [(side, side)]


def bucket_step(cfg: RunConfig, family: Family) -> int:
    """The family's bucket step for the base model, from its config files (no weights loaded): the family's recipe
    reads the VAE's scale factor (as diffusers' pipelines compute it) and the denoiser's config."""
    from studio.models import vae_scale_factor
    from studio.plan.models import image_source  # the model's configs, or the family's shipped ones
    folder = image_source(cfg.base_model, family, allow_unsafe_pickle=cfg.allow_unsafe_pickle).folder
    recipe = family.load_recipe()
    vae = _read_config(folder / "vae" / "config.json")
    pipe = SimpleNamespace(vae_scale_factor=vae_scale_factor(vae))
    denoiser = folder / recipe.denoiser / "config.json"
    if denoiser.is_file():
        setattr(pipe, recipe.denoiser, SimpleNamespace(config=SimpleNamespace(**_read_config(denoiser))))
    return recipe.bucket_step(pipe)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudioError(f"Cannot read {path} to size the buckets: {exc}. Check the base model folder.") from None


def _without_held_out(cfg: RunConfig, items: list[CheckedImage]) -> list[CheckedImage]:
    """The images training trains on: validation_split holds some out (the same ones training picks)."""
    if not cfg.validation_split or cfg.validation_dir:
        return items
    try:
        return split_held_out(items, cfg, "images")[0]
    except StudioError:
        return items  # training reports it when it starts


def training_steps(cfg: RunConfig, buckets_of: list[tuple[int, int]]) -> int | None:
    """Optimizer updates the run makes: max_train_steps, else epochs × the per-bucket batches of an epoch
    (studio.data.images.bucket_batches: each batch holds one bucket)."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    if not buckets_of:
        return None
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    per_bucket: dict[tuple[int, int], int] = {}
    for bucket in buckets_of:
        per_bucket[bucket] = per_bucket.get(bucket, 0) + cfg.repeats
    return cfg.epochs * sum(math.ceil(n / effective) for n in per_bucket.values())


def caption_lengths(captions: dict[str, str]) -> dict[str, tuple[int, float, int]]:
    """(min, median, max) words and tags per non-empty caption."""
    filled = [c for c in captions.values() if c.strip()]
    if not filled:
        return {}
    words = [len(c.split()) for c in filled]
    tags = [len(split_tags(c)) for c in filled]
    return {"words": (min(words), statistics.median(words), max(words)),
            "tags": (min(tags), statistics.median(tags), max(tags))}
