"""Copy a finished image LoRA into SD WebUI's `models/Lora` or ComfyUI's `models/loras`, ready for `<lora:name:0.8>`."""

from __future__ import annotations

import shutil
from pathlib import Path

from studio.errors import StudioError
from studio.fileio import atomic_path

KNOWN_FOLDER_NAMES = {"lora", "loras", "lycoris"}


def install_lora(adapter: str | Path, lora_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Copy `adapter` (.safetensors) into the existing folder `lora_dir`; returns the installed file.

    The folder must exist (a typo must not create folders elsewhere); an existing file of the same name is kept unless
    `overwrite`. The copy is atomic: WebUI never sees half a file.
    """
    adapter = Path(adapter)
    if not adapter.is_file() or adapter.suffix.lower() != ".safetensors":
        raise StudioError(f"{adapter} is not a LoRA .safetensors file. Pick a finished image run.")
    folder = Path(str(lora_dir).strip()).expanduser()
    if not str(lora_dir).strip():
        raise StudioError("Give the LoRA folder: stable-diffusion-webui/models/Lora or ComfyUI/models/loras.")
    if not folder.is_dir():
        raise StudioError(f"{folder} is not an existing folder. Give the models/Lora folder of your WebUI "
                          "(stable-diffusion-webui/models/Lora) or ComfyUI (ComfyUI/models/loras).")
    target = folder / adapter.name
    if target.exists() and not overwrite:
        raise StudioError(f"{target} already exists. Tick 'Replace a file of the same name' to replace it, or rename "
                          "the run.")
    with atomic_path(target) as tmp:
        shutil.copyfile(adapter, tmp)
    return target


def prompt_tag(adapter: str | Path, strength: float = 0.8) -> str:
    """What to type in a WebUI prompt to use the LoRA."""
    return f"<lora:{Path(adapter).stem}:{strength:g}>"


def folder_hint(lora_dir: str | Path) -> str:
    """A note when the folder does not look like a LoRA folder (still allowed: users organise their own way)."""
    name = Path(str(lora_dir)).expanduser().name.lower()
    if name in KNOWN_FOLDER_NAMES:
        return ""
    return (f"Note: WebUI reads LoRAs from models/Lora and ComfyUI from models/loras; '{name}' is neither, so "
            "make sure your app looks there.")
