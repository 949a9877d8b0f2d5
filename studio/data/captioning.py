"""Auto-labelling: a first caption for every image in a folder — a sentence (BLIP, or a VLM such as Qwen2.5-VL,
Florence-2 or JoyCaption) and/or tags (CLIP against a phrase vocabulary, or a WD14 tagger).

`auto_label` is the one entry point: tools/auto_label.py and the studio's Dataset tab both call it. Models are loaded
once per run and see `batch_size` images per forward pass (studio.data.label_models, .vlm, .wd14); the tag
vocabulary's text embeddings are computed once. Nothing keeps a model once `auto_label` returns, so training that
starts next gets the memory back. Existing captions (metadata.csv or .txt sidecars) are never replaced unless asked,
so hand edits survive a second run.
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from studio.data.captions import list_images, read_csv_captions, write_csv_captions, write_sidecar_captions
from studio.data.image_io import ImageReadError, read_image
from studio.data.label_models import (DEFAULT_BLIP, DEFAULT_CLIP, BlipCaptioner, OpenClip, Tagger, TransformersClip,
                                      available_backends)
from studio.data.tagging import VOCAB_DIR, load_vocabulary
from studio.data.vlm import DEFAULT_INSTRUCTION, DEFAULT_MAX_TOKENS, DEFAULT_VLM, VlmCaptioner
from studio.data.wd14 import DEFAULT_CHARACTER_THRESHOLD, DEFAULT_GENERAL_THRESHOLD, DEFAULT_WD14, Wd14Tagger
from studio.errors import StudioError
from studio.hardware import inference_dtype, pick_device


@dataclass(frozen=True)
class Mode:
    title: str
    sentences: str | None  # "blip" or "vlm": the model that writes a sentence
    tags: str | None  # "clip" or "wd14": the model that adds tags


MODES = {
    "caption+tags": Mode("BLIP caption + CLIP tags", "blip", "clip"),
    "caption": Mode("BLIP caption", "blip", None),
    "tags": Mode("CLIP tags", None, "clip"),
    "wd14": Mode("WD14 tagger tags (anime, characters)", None, "wd14"),
    "vlm": Mode("VLM caption (Qwen-VL, SmolVLM, Florence-2, JoyCaption)", "vlm", None),
    "vlm+wd14": Mode("VLM caption + WD14 tags", "vlm", "wd14"),
}
FORMATS = {"csv": "metadata.csv (filename,prompt)", "txt": "a .txt sidecar per image (kohya)"}
CLIP_BACKENDS = {"clip": TransformersClip, "open_clip": OpenClip}
DEFAULT_MODE = "caption+tags"
DEFAULT_THRESHOLD = 0.2  # cosine similarity; phrases that fit an image score ~0.2-0.35 with CLIP ViT-L/14
DEFAULT_MAX_TAGS = 8

Progress = Callable[[int, int, float], None]  # (images done, images to label, images labelled per second)


@dataclass(frozen=True)
class LabelModels:
    """The models a run may load and their settings; a model is a hub id or a local folder, None its default.
    A run loads only what its mode names (MODES)."""

    blip_model: str | None = None
    clip_backend: str = "clip"
    clip_model: str | None = None
    vocabulary: str | Path = VOCAB_DIR  # the CLIP tag phrases: a folder of .txt files
    threshold: float = DEFAULT_THRESHOLD  # CLIP: min cosine similarity of a tag
    max_tags: int = DEFAULT_MAX_TAGS  # CLIP: tags per image
    wd14_model: str | None = None
    general_threshold: float = DEFAULT_GENERAL_THRESHOLD  # WD14: min score of a general tag
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD  # WD14: min score of a character tag
    rating_tags: bool = False  # WD14: put the most likely rating (general, sensitive, ...) first
    vlm_model: str | None = None
    instruction: str = DEFAULT_INSTRUCTION  # VLM: what the model is asked about each image
    vlm_max_tokens: int = DEFAULT_MAX_TOKENS  # VLM: the longest caption, in tokens

    def __post_init__(self):
        problems = []
        if self.clip_backend not in CLIP_BACKENDS:
            problems.append(f"Unknown clip backend '{self.clip_backend}'. Allowed: {', '.join(CLIP_BACKENDS)}.")
        if self.max_tags < 0:
            problems.append(f"The maximum number of tags must be at least 0 (got {self.max_tags}).")
        if self.vlm_max_tokens < 1:
            problems.append(f"The VLM caption length must be at least 1 token (got {self.vlm_max_tokens}).")
        for name in ("general_threshold", "character_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"The WD14 {name.replace('_', ' ')} is a score between 0 and 1 "
                                f"(got {getattr(self, name)}).")
        if not self.instruction.strip():
            problems.append("The VLM instruction is empty. Say what to write, e.g. "
                            f"'{DEFAULT_INSTRUCTION}'.")
        if problems:
            raise StudioError("\n".join(problems))


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


@dataclass
class Existing:
    """The captions already there, from metadata.csv and .txt sidecars (metadata.csv wins, as in training)."""
    captions: dict[str, str]
    only_in_sidecars: set[str]  # images whose caption is in a sidecar and not in metadata.csv


def auto_label(input_dir: str | Path, output: str | Path | None = None, *, mode: str = DEFAULT_MODE,
               output_format: str = "csv", overwrite: bool = False, trigger_word: str = "", batch_size: int = 8,
               device: str = "auto", models: LabelModels = LabelModels(),
               progress: Progress | None = None) -> LabelReport:
    """Caption every image in `input_dir` that has no caption yet (every image with `overwrite`).

    output: the metadata.csv to write (default input_dir/metadata.csv), or with output_format="txt" the folder for
    the sidecars (default input_dir). A caption in metadata.csv or a .txt sidecar counts as existing either way.
    Unreadable images are skipped and listed in the report; whatever was labelled is written even if the run is
    interrupted. The models are released before this returns.
    """
    _check_options(mode, output_format, batch_size, models)
    input_dir = Path(input_dir)
    images = _images_in(input_dir)
    target = Path(output) if output else (input_dir / "metadata.csv" if output_format == "csv" else input_dir)
    existing = _read_existing(input_dir, target, output_format, images)
    todo = [path for path in images if overwrite or not existing.captions.get(path.name)]  # empty counts as none
    report = LabelReport(target, kept=[p.name for p in images if not overwrite and existing.captions.get(p.name)])
    if output_format == "txt" and (input_dir / "metadata.csv").is_file():
        report.notes.append(f"Note: {input_dir / 'metadata.csv'} exists; training reads it instead of .txt sidecars.")
    if not todo:
        return report
    label = _build_labeler(mode, trigger_word, device, models)
    try:
        _label_all(todo, label, batch_size, report, progress)
    finally:
        del label  # the only reference to the models: they are freed here, not when the next run starts
        _release_memory()
        _write(target, output_format, existing, report)
    return report


def compose_caption(trigger_word: str, sentence: str, tags: list[str]) -> str:
    """Trigger word first, then the sentence, then the tags: comma-separated, like the captions training reads."""
    return ", ".join(dict.fromkeys(part for part in [trigger_word.strip(), sentence, *tags] if part))


# --- steps of a run ------------------------------------------------------------------------------------------------

def _check_options(mode: str, output_format: str, batch_size: int, models: LabelModels) -> None:
    for name, (value, allowed) in {"mode": (mode, MODES), "format": (output_format, FORMATS)}.items():
        if value not in allowed:
            raise StudioError(f"Unknown {name} '{value}'. Allowed: {', '.join(allowed)}.")
    if batch_size < 1:
        raise StudioError(f"The batch size must be at least 1 (got {batch_size}).")
    tagger = models.clip_backend if MODES[mode].tags == "clip" else MODES[mode].tags  # the optional packages
    usable, reason = available_backends()[tagger] if tagger else (True, "")
    if not usable:
        raise StudioError(f"The {tagger} backend is not available here: {reason}")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise StudioError(f"Image folder {folder} does not exist.")
    images = list_images(folder)
    if not images:
        raise StudioError(f"{folder} holds no images (.jpg, .jpeg, .png, .webp or .bmp).")
    return images


def _read_existing(input_dir: Path, target: Path, output_format: str, images: list[Path]) -> Existing:
    """Captions from the sidecars beside the images (and in the sidecar output folder) and from metadata.csv (the
    output, or the dataset's). A broken metadata.csv is an error: we never overwrite what we cannot read."""
    csv_path = target if output_format == "csv" else input_dir / "metadata.csv"
    rows = read_csv_captions(csv_path) if csv_path.is_file() else {}
    folders = dict.fromkeys([input_dir, target] if output_format == "txt" else [input_dir])
    sidecars = {}
    for folder, path in itertools.product(folders, images):
        txt = folder / f"{path.stem}.txt"
        if txt.is_file() and (caption := txt.read_text(encoding="utf-8").strip()):
            sidecars[path.name] = caption
    only_in_sidecars = {name for name in sidecars if not rows.get(name)}
    return Existing({**rows, **{name: sidecars[name] for name in only_in_sidecars}}, only_in_sidecars)


def _build_labeler(mode: str, trigger_word: str, device: str,
                   models: LabelModels) -> Callable[[list[Image.Image]], list[str]]:
    """Load the run's models once; the returned function captions one batch of images."""
    phrases = load_vocabulary(models.vocabulary) if MODES[mode].tags == "clip" else []  # before slow loads
    torch_device = pick_device(device)
    dtype = inference_dtype(torch_device)
    describe = _sentence_model(MODES[mode].sentences, models, torch_device, dtype)
    tag = _tag_model(MODES[mode].tags, models, phrases, torch_device, dtype)

    def label(images: list[Image.Image]) -> list[str]:
        sentences = describe(images) if describe else [""] * len(images)
        tags = tag(images) if tag else [[]] * len(images)
        return [compose_caption(trigger_word, s, t) for s, t in zip(sentences, tags)]

    return label


def _sentence_model(source: str | None, models: LabelModels, device: torch.device, dtype: torch.dtype):
    if source == "blip":
        return BlipCaptioner(models.blip_model or DEFAULT_BLIP, device, dtype)
    if source == "vlm":
        return VlmCaptioner(models.vlm_model or DEFAULT_VLM, models.instruction, models.vlm_max_tokens, device,
                            dtype)
    return None


def _tag_model(source: str | None, models: LabelModels, phrases: list[str], device: torch.device,
               dtype: torch.dtype):
    if source == "clip":
        encoder = CLIP_BACKENDS[models.clip_backend](models.clip_model or DEFAULT_CLIP[models.clip_backend], device,
                                                     dtype)
        return Tagger(encoder, phrases, models.threshold, models.max_tags)
    if source == "wd14":
        return Wd14Tagger(models.wd14_model or DEFAULT_WD14, models.general_threshold, models.character_threshold,
                          models.rating_tags, use_cuda=device.type == "cuda")
    return None


def _release_memory() -> None:
    gc.collect()  # model graphs can hold reference cycles; collect them now rather than at some later allocation
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
            image = read_image(path)
        except ImageReadError as exc:
            report.skipped[path.name] = str(exc).removeprefix(f"{path.name}: ")
            continue
        yield path.name, image


def _report_progress(progress: Progress | None, report: LabelReport, total: int, reported: int) -> int:
    """Tell `progress` how many files are done, if that changed since `reported`; returns the new count."""
    done = len(report.labelled) + len(report.skipped)
    if progress and done != reported:
        progress(done, total, report.images_per_s)
    return done


def _write(target: Path, output_format: str, existing: Existing, report: LabelReport) -> None:
    if not report.labelled:
        return
    if output_format == "txt":
        write_sidecar_captions(target, report.labelled)
        return
    # Rows of images not in the folder are kept too; so are sidecar captions, which training ignores once
    # metadata.csv exists.
    write_csv_captions(target, {**existing.captions, **report.labelled})
    copied = existing.only_in_sidecars & set(report.kept)
    if copied:
        report.notes.append(f"Copied {len(copied)} caption(s) from .txt sidecars into {target.name}: training "
                            "reads metadata.csv instead of sidecars when it exists.")
