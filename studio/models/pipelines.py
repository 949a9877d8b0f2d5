"""Load a Stable Diffusion base model — diffusers folder, hub id, or single-file checkpoint — as a pipeline.

Used by the diffusion engine and the image preview, so both read models the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from studio.errors import StudioError

SUPPORTED_CLASSES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


def pipeline_family(pipe: DiffusionPipeline) -> str:
    return "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"


def load_sd_pipeline(base_model: str, *, allow_unsafe_pickle: bool = False,
                     torch_dtype: torch.dtype | None = None) -> tuple[DiffusionPipeline, str]:
    """(pipeline, family) for `base_model`; every failure is a StudioError that says what to do."""
    path = Path(base_model).expanduser()
    if path.is_file():
        from studio.models.single_file import load_single_file
        return load_single_file(path, allow_unsafe_pickle=allow_unsafe_pickle, torch_dtype=torch_dtype)
    if path.is_dir():
        _check_local_folder(path)
    try:
        # The safety checker is an image classifier for hosted demos; a training studio does not load it.
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.is_dir() else base_model, dtype=torch_dtype,
                                                 safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise StudioError(
            f"Could not load the base model '{base_model}': {str(exc).splitlines()[0]}\n"
            "Give a local diffusers folder or a .safetensors checkpoint, or download the model first "
            f"(`hf download {base_model} --local-dir models/{Path(base_model).name}`) on a machine "
            "with internet access.") from None
    if type(pipe).__name__ not in SUPPORTED_CLASSES:
        raise StudioError(f"'{base_model}' is a {type(pipe).__name__}; LoRA Studio trains Stable Diffusion 1.x "
                          "and SDXL models.")
    return pipe, pipeline_family(pipe)


def _check_local_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise StudioError(f"{path} is a folder but not a diffusers model (no model_index.json). Point base_model at "
                          "the model's folder, or at a single .safetensors checkpoint file.")
    cls = json.loads(index.read_text()).get("_class_name", "?")
    if cls not in SUPPORTED_CLASSES:
        raise StudioError(f"{path} holds a {cls}; LoRA Studio trains Stable Diffusion 1.x and SDXL models "
                          f"({', '.join(SUPPORTED_CLASSES)}).")
