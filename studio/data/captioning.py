"""Auto-labelling: a first caption for every image in a folder, from BLIP (one sentence) and/or CLIP (tags).

`auto_label` is the one entry point: tools/auto_label.py and the studio's Dataset tab both call it. Models are loaded
once per run and see `batch_size` images per forward pass (studio.data.label_models); the tag vocabulary's text
embeddings are computed once. Existing captions are never replaced unless asked, so hand edits survive a second run.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, UnidentifiedImageError

from studio.data.captions import list_images, read_csv_captions, write_csv_captions, write_sidecar_captions
from studio.data.label_models import (DEFAULT_BLIP, DEFAULT_CLIP, BlipCaptioner, OpenClip, Tagger, TransformersClip,
                                      available_backends)
from studio.data.tagging import VOCAB_DIR, load_vocabulary
from studio.errors import StudioError
from studio.hardware import inference_dtype, pick_device

# A mode names what it writes; the run loads BLIP when it holds "caption" and CLIP when it holds "tags".
MODES = {"caption+tags": "BLIP caption + CLIP tags", "caption": "BLIP caption", "tags": "CLIP tags"}
FORMATS = {"csv": "metadata.csv (filename,prompt)", "txt": "a .txt sidecar per image (kohya)"}
CLIP_BACKENDS = {"clip": TransformersClip, "open_clip": OpenClip}
DEFAULT_MODE = "caption+tags"
DEFAULT_THRESHOLD = 0.2  # cosine similarity; phrases that fit an image score ~0.2-0.35 with CLIP ViT-L/14
DEFAULT_MAX_TAGS = 8
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Progress = Callable[[int, int, float], None]  # (images done, images to label, images labelled per second)


@dataclass
class LabelReport:
    output: Path  # the metadata.csv, or the folder of .txt sidecars
    labelled: dict[str, str] = field(default_factory=dict)  # filename → new caption
    kept: list[str] = field(default_factory=list)  # images whose existing caption was left alone
    skipped: dict[str, str] = field(default_factory=dict)  # filename → why it could not be read
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # time spent labelling; model loading excluded

    @property
    def images_per_s(self) -> float:
        return len(self.labelled) / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        lines = [f"Labelled {len(self.labelled)} image(s) ({self.images_per_s:.1f} images/s), kept "
                 f"{len(self.kept)} existing caption(s); captions in {self.output}."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} unreadable image(s):")
            lines += [f"  - {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines + self.notes)


def auto_label(input_dir: str | Path, output: str | Path | None = None, *, mode: str = DEFAULT_MODE,
               output_format: str = "csv", overwrite: bool = False, trigger_word: str = "",
               max_tags: int = DEFAULT_MAX_TAGS, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8,
               device: str = "auto", clip_backend: str = "clip", clip_model: str | None = None,
               blip_model: str | None = None, vocabulary: str | Path = VOCAB_DIR,
               progress: Progress | None = None) -> LabelReport:
    """Caption every image in `input_dir` that has no caption yet (every image with `overwrite`).

    output: the metadata.csv to write (default input_dir/metadata.csv), or with output_format="txt" the folder for
    the sidecars (default input_dir). Models are given as hub ids or local folders. Unreadable images are skipped
    and listed in the report; whatever was labelled is written even if the run is interrupted.
    """
    _check_options(mode, output_format, clip_backend, batch_size, max_tags)
    input_dir = Path(input_dir)
    images = _images_in(input_dir)
    target = Path(output) if output else (input_dir / "metadata.csv" if output_format == "csv" else input_dir)
    existing = _read_existing(target, output_format, images)
    todo = [path for path in images if overwrite or not existing.get(path.name)]  # an empty caption counts as none
    report = LabelReport(target, kept=[path.name for path in images if not overwrite and existing.get(path.name)])
    if output_format == "txt" and (input_dir / "metadata.csv").is_file():
        report.notes.append(f"Note: {input_dir / 'metadata.csv'} exists; training reads it instead of .txt sidecars.")
    if not todo:
        return report
    label = _build_labeler(mode, trigger_word, max_tags, threshold, device, clip_backend, clip_model, blip_model,
                           vocabulary)
    try:
        _label_all(todo, label, batch_size, report, progress)
    finally:
        _write(target, output_format, existing, report.labelled)
    return report


def compose_caption(trigger_word: str, sentence: str, tags: list[str]) -> str:
    """Trigger word first, then the sentence, then the tags: comma-separated, like the captions training reads."""
    return ", ".join(dict.fromkeys(part for part in [trigger_word.strip(), sentence, *tags] if part))


def load_rgb(path: Path) -> Image.Image:
    """The image as RGB; transparency is composited on white (transparent pixels often hide black, which CLIP sees)."""
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here and is skipped
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        return img.convert("RGB")


# --- steps of a run ------------------------------------------------------------------------------------------------

def _check_options(mode: str, output_format: str, clip_backend: str, batch_size: int, max_tags: int) -> None:
    choices = {"mode": (mode, MODES), "format": (output_format, FORMATS), "clip backend": (clip_backend, CLIP_BACKENDS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise StudioError(f"Unknown {name} '{value}'. Allowed: {', '.join(allowed)}.")
    if batch_size < 1:
        raise StudioError(f"The batch size must be at least 1 (got {batch_size}).")
    if max_tags < 0:
        raise StudioError(f"The maximum number of tags must be at least 0 (got {max_tags}).")
    usable, reason = available_backends()[clip_backend]
    if "tags" in mode and not usable:
        raise StudioError(f"The {clip_backend} backend is not available here: {reason}")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise StudioError(f"Image folder {folder} does not exist.")
    images = list_images(folder)
    if not images:
        raise StudioError(f"{folder} holds no images (.jpg, .jpeg, .png, .webp or .bmp).")
    return images


def _read_existing(target: Path, output_format: str, images: list[Path]) -> dict[str, str]:
    """The captions already there (a broken metadata.csv is an error: we never overwrite what we cannot read)."""
    if output_format == "csv":
        return read_csv_captions(target) if target.is_file() else {}
    sidecars = {path.name: target / f"{path.stem}.txt" for path in images}
    return {name: txt.read_text(encoding="utf-8").strip() for name, txt in sidecars.items() if txt.is_file()}


def _build_labeler(mode: str, trigger_word: str, max_tags: int, threshold: float, device: str, clip_backend: str,
                   clip_model: str | None, blip_model: str | None,
                   vocabulary: str | Path) -> Callable[[list[Image.Image]], list[str]]:
    """Load the run's models once; the returned function captions one batch of images."""
    phrases = load_vocabulary(vocabulary) if "tags" in mode else []  # before the slow loads: fail fast
    torch_device = pick_device(device)
    dtype = inference_dtype(torch_device)
    captioner = BlipCaptioner(blip_model or DEFAULT_BLIP, torch_device, dtype) if "caption" in mode else None
    tagger = None
    if "tags" in mode:
        encoder = CLIP_BACKENDS[clip_backend](clip_model or DEFAULT_CLIP[clip_backend], torch_device, dtype)
        tagger = Tagger(encoder, phrases, threshold, max_tags)

    def label(images: list[Image.Image]) -> list[str]:
        sentences = captioner(images) if captioner else [""] * len(images)
        tags = tagger(images) if tagger else [[]] * len(images)
        return [compose_caption(trigger_word, s, t) for s, t in zip(sentences, tags)]

    return label


def _label_all(paths: list[Path], label: Callable[[list[Image.Image]], list[str]], batch_size: int,
               report: LabelReport, progress: Progress | None) -> None:
    """Label `paths` in full batches (unreadable files are skipped without shrinking a batch)."""
    if progress:
        progress(0, len(paths), 0.0)  # the models are loaded: labelling starts now
    start, reported = time.perf_counter(), 0
    readable = _readable(paths, report)
    while batch := list(itertools.islice(readable, batch_size)):
        names, images = zip(*batch)
        report.labelled.update(zip(names, label(list(images))))
        report.seconds = time.perf_counter() - start
        reported = _report_progress(progress, report, len(paths), reported)
    _report_progress(progress, report, len(paths), reported)  # unreadable files after the last batch


def _readable(paths: list[Path], report: LabelReport) -> Iterator[tuple[str, Image.Image]]:
    for path in paths:
        try:
            image = load_rgb(path)
        except UNREADABLE as exc:
            report.skipped[path.name] = f"cannot be read as an image ({exc})"
            continue
        yield path.name, image


def _report_progress(progress: Progress | None, report: LabelReport, total: int, reported: int) -> int:
    """Tell `progress` how many files are done, if that changed since `reported`; returns the new count."""
    done = len(report.labelled) + len(report.skipped)
    if progress and done != reported:
        progress(done, total, report.images_per_s)
    return done


def _write(target: Path, output_format: str, existing: dict[str, str], labelled: dict[str, str]) -> None:
    if not labelled:
        return
    if output_format == "csv":
        write_csv_captions(target, {**existing, **labelled})  # rows of images not in the folder are kept too
    else:
        write_sidecar_captions(target, labelled)
