"""The run config's checks beyond each value's own rules: keys that must agree with each other, and the paths
(resolved in place; those that do not exist, or hold data of the other task, reported)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from studio.families import AUTO, all_families, get_family
from studio.tasks import IMAGE_TASK, TEXT_TASK

if TYPE_CHECKING:
    from studio.config import RunConfig


def check_consistency(cfg: RunConfig) -> list[str]:
    problems = []
    if not cfg.base_model:
        problems.append("'base_model' is empty. Set it to a model folder, a hub id, or a .safetensors checkpoint.")
    if not cfg.train_data_dir:
        problems.append("'train_data_dir' is empty. Set it to the folder that holds the training data.")
    if not cfg.output_dir:
        problems.append("'output_dir' is empty. Set it to the folder where the LoRA should be written.")
    if cfg.validation_split and cfg.validation_dir:
        problems.append(f"'validation_split' is {cfg.validation_split} and 'validation_dir' is set; both choose the "
                        "held-out samples. Keep one: remove validation_dir, or set validation_split: 0.")
    if cfg.distributed == "fsdp" and (cfg.is_image or cfg.num_processes < 2):
        problems.append("'distributed' is fsdp, which shards an LLM over several GPUs; it needs task_type "
                        f"{TEXT_TASK} and num_processes 2 or more. Use distributed: ddp otherwise.")
    if cfg.model_family != AUTO and get_family(cfg.model_family).task != cfg.task_type:
        fitting = ", ".join(f.name for f in all_families(cfg.task_type))
        problems.append(f"'model_family' is {cfg.model_family} but task_type is {cfg.task_type}; use {fitting} "
                        "or auto.")
    return problems


def looks_local(value: str) -> bool:
    """A hub id is `name` or `org/name`; anything with a file suffix, ./, / or ~ is meant as a local path."""
    return (value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1
            or Path(value).suffix.lower() in {".safetensors", ".ckpt", ".pt", ".bin", ".pth"})


def check_paths(cfg: RunConfig, base_dir: Path) -> list[str]:
    """Resolve every path field in place; report those that do not exist."""
    problems = []
    for f in dataclasses.fields(cfg):
        name, kind = f.name, f.metadata.get("path")
        value = getattr(cfg, name)
        if not kind or not value:
            continue
        if kind == "resume" and value == "latest":
            continue
        path = (base_dir / Path(value).expanduser()).resolve()
        if kind == "model" and not path.exists() and not looks_local(value):
            continue  # a hub id: checked when the model loads
        if not path.exists():
            problems.append(f"'{name}' points to {path}, which does not exist. Check the path "
                            f"(relative paths are read from {base_dir}).")
        elif kind == "data" and cfg.is_image and not path.is_dir():
            problems.append(f"'{name}' is {path}, which is a file; for image training it must be the folder "
                            "that holds the images.")
        elif kind == "data" and (mismatch := data_task_mismatch(cfg, name, path)):
            problems.append(mismatch)
        elif kind == "file" and not path.is_file():
            problems.append(f"'{name}' is {path}, which is a folder; it must be a file.")
        else:
            setattr(cfg, name, str(path))
    for name in ("output_dir", "logging_dir"):
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, str((base_dir / Path(value).expanduser()).resolve()))
    return problems


def data_task_mismatch(cfg: RunConfig, name: str, path: Path) -> str | None:
    """Images for an LLM run, or only text files for an image run: caught here, not when training starts."""
    from studio.data.captions import list_images

    if not path.is_dir():
        return None
    files = [p for p in path.iterdir() if p.is_file()]
    images = len(list_images(path))
    if not cfg.is_image and images:
        return (f"'{name}' is {path}, which holds {images} image(s): task_type {TEXT_TASK} trains on text "
                "(.jsonl / .json chats or .txt). Pick a text dataset, or set task_type: "
                f"{IMAGE_TASK} to train an image LoRA.")
    if cfg.is_image and not images and any(p.suffix.lower() in (".jsonl", ".json") for p in files):
        return (f"'{name}' is {path}, which holds text data and no images: task_type {IMAGE_TASK} trains on "
                f"images. Pick an image dataset, or set task_type: {TEXT_TASK} to train an LLM LoRA.")
    return None
