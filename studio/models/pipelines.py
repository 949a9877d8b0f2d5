"""Load an image base model — diffusers folder, hub id, or single-file checkpoint — as a diffusers pipeline, with the
registered family it belongs to. Used by the diffusion engine, the image preview and the planner's sources, so all
read models the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from studio.config_checks import looks_local
from studio.errors import StudioError
from studio.families import Family, family_of_pipeline_class, supported_text
from studio.tasks import IMAGE_TASK


def load_pipeline(base_model: str, *, allow_unsafe_pickle: bool = False, torch_dtype: torch.dtype | None = None,
                  components: str | None = None) -> tuple[DiffusionPipeline, Family]:
    """(pipeline, family) for `base_model`; every failure is a StudioError that says what to do. `components` is
    where a single-file checkpoint's missing parts (text encoders, VAE, tokenizers) come from, for the families whose
    files hold only the denoiser (Flux.1)."""
    path = Path(base_model).expanduser()
    if path.is_file():
        from studio.models.single_file import detect_family
        family = detect_family(path, allow_unsafe_pickle=allow_unsafe_pickle)
        return family.load_single_file(path, allow_unsafe_pickle=allow_unsafe_pickle, torch_dtype=torch_dtype,
                                       components=components), family
    if path.is_dir():
        _check_local_folder(path)
    source = str(path) if path.is_dir() else base_model
    try:
        # The safety checker is an image classifier for hosted demos; a training studio does not load it.
        has_checker = "safety_checker" in DiffusionPipeline.load_config(source)
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components": the studio says "Loading <model>"
        pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, **(
            {"safety_checker": None, "requires_safety_checker": False} if has_checker else {}))
    except (OSError, ValueError, EnvironmentError):
        if looks_local(base_model):
            raise StudioError(f"The base model {base_model} does not exist. Give a diffusers model folder or a "
                              ".safetensors checkpoint file.") from None
        raise StudioError(
            f"Could not load the base model '{base_model}': it is not downloaded here, and the Hugging Face Hub "
            "cannot be reached or has no such model. Download it on a machine with internet access "
            f"(`hf download {base_model} --local-dir models/{Path(base_model).name}`) and set base_model to that "
            "folder.") from None
    return pipe, _family_of(type(pipe).__name__, base_model)


def _family_of(cls: str, where: str) -> Family:
    family = family_of_pipeline_class(cls)
    if family is None:
        raise StudioError(f"{where} holds a {cls}; LoRA Studio trains text-to-image {supported_text(IMAGE_TASK)} "
                          f"models (fill, inpainting, control, Kontext and Redux variants are not supported).")
    return family


def _check_local_folder(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise StudioError(f"{path} is a folder but not a diffusers model (no model_index.json). Point base_model at "
                          "the model's folder, or at a single .safetensors checkpoint file.")
    _family_of(json.loads(index.read_text()).get("_class_name", "?"), str(path))
