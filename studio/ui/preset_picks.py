"""What picking a preset picks with it: base models of the preset's family first (demo-flux names Flux.1, so the
tiny Flux, not the SD demo), and a dataset of the kind its task trains on (chats for an LLM preset, images for an
image one) — a preset never leaves the Config tab with a model or data that cannot train it."""

from __future__ import annotations

from studio.config import IMAGE_TASK, TEXT_TASK, load_preset
from studio.data.captions import list_images
from studio.data.text import list_text_files
from studio.errors import StudioError
from studio.families import AUTO, detect_family
from studio.ui.context import Studio


def is_text_preset(preset: str) -> bool:
    return load_preset(preset).get("task_type") == TEXT_TASK


def models_for(studio: Studio, preset: str) -> list[tuple[str, str]]:
    """(label, value) base models for the preset's task, those of the family it names first."""
    text = is_text_preset(preset)
    models = studio.model_choices(image=not text)
    family = load_preset(preset).get("model_family", AUTO)
    if family != AUTO:  # a stable sort: the studio's order within each group
        models.sort(key=lambda choice: detect_family(TEXT_TASK if text else IMAGE_TASK, choice[1]).name != family)
    return models


def dataset_for(studio: Studio, preset: str, current: str | None) -> str | None:
    """`current` when it holds the kind of data the preset's task trains on (or nothing yet), else the first
    dataset that does; `current` when none does (Validate then says what is wrong)."""
    text = is_text_preset(preset)

    def fits(value: str) -> bool:
        try:
            folder = studio.dataset_path(value)
        except StudioError:
            return False
        images, texts = bool(list_images(folder)), bool(list_text_files(folder))
        return not images if text else images or not texts

    if current and fits(current):
        return current
    return next((value for _, value in studio.dataset_choices() if fits(value)), current)
