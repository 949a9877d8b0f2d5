"""The model families LoRA Studio trains, one record each, in one registry.

A family is one module here (sd15.py, sdxl.py, flux1.py, llm.py) that builds a `Family` and calls `register`. The
record says how to recognise the family (a diffusers `model_index.json` class, a single-file checkpoint's tensor
names, a hub id), how to load it, which engine trains it and with which recipe (studio/engines/), the defaults it
brings to the presets, what the exported file says about it, and how to sample it. Engines, the planner, the
exporter, the preview and the Config tab ask this registry; nothing outside a family's module branches on its name.

Nothing here imports torch: the UI reads the records (names, labels, presets) at start-up. The heavy parts are named
as "module:attribute" and imported when used.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from studio.errors import StudioError
from studio.tasks import IMAGE_TASK, TEXT_TASK

Shapes = Mapping[str, tuple]  # tensor name → shape, from a checkpoint's header


AUTO = "auto"  # the model_family value that means "detect it from the weights"

# Smaller base-weight formats a family may offer, and the config key that turns each on.
BASE_FORMAT_KEYS = {"fp8": "fp8_base", "nf4": "load_in_4bit"}


@dataclass(frozen=True)
class Family:
    name: str  # the config's model_family value
    label: str  # what people call it
    task: str  # IMAGE_TASK or TEXT_TASK
    engine: str  # "module:Class" of the engine that trains it
    recipe: str = ""  # "module:Class": what this family's training needs from the engine (images: studio.engines.diffusion)
    pipeline_classes: tuple[str, ...] = ()  # diffusers model_index.json `_class_name`s of this family
    recognise: Callable[[Shapes, str], bool] | None = None  # single-file checkpoint header → is it this family
    single_file_loader: str = ""  # "module:function"(path, *, allow_unsafe_pickle, torch_dtype) → pipeline
    name_hints: tuple[str, ...] = ()  # substrings of a hub id that name the family (when no file can be read)
    config_dir: str = ""  # shipped configs (no weights) under studio/models/configs/: single files, the planner
    native_resolution: int | None = None  # images: the resolution it was trained at
    preset_values: Mapping[str, Any] = field(default_factory=dict)  # values the presets take on this family
    trains_text_encoder: bool = True  # images: whether train_text_encoder is supported
    quantized_base: tuple[str, ...] = ()  # smaller base-weight formats the fit may choose (BASE_FORMAT_KEYS)
    webui_version: str = ""  # ss_base_model_version in the exported header (what A1111 / Forge filter LoRAs by)
    network_module: str = "networks.lora"  # ss_network_module, as kohya sd-scripts writes it
    # images: ModelSpec's id of the base architecture and implementation, as kohya's sai_model_spec writes them for
    # LoRAs (Forge tells SD1 / SDXL / Flux files apart by them)
    modelspec_architecture: str = ""
    modelspec_implementation: str = ""
    lora_markers: tuple[str, ...] = ()  # denoiser key prefixes of an adapter file made for this family
    network_types: tuple[str, ...] = ("lora",)  # the config's network_type values its engine and export support
    lora_loaders: tuple[str, ...] = ("A1111", "Forge", "ComfyUI", "diffusers")  # images: what loads its LoRA files

    def load_recipe(self):
        return _attr(self.recipe)()

    def engine_class(self):
        return _attr(self.engine)

    def load_single_file(self, path: Path, **kwargs):
        return _attr(self.single_file_loader)(path, **kwargs)

    @property
    def config_path(self) -> Path:
        from studio.models import CONFIG_ROOT
        return CONFIG_ROOT / self.config_dir


_REGISTRY: dict[str, Family] = {}
# The family modules, imported once on first use (each calls `register`). A new family is one module and one line.
FAMILY_MODULES = ("sd15", "sdxl", "flux1", "chroma", "z_image", "qwen_image", "flux2_klein", "llm")


def register(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name} is registered twice")
    _REGISTRY[family.name] = family
    return family


def _families() -> dict[str, Family]:
    if len(_REGISTRY) < len(FAMILY_MODULES):  # a family module imported directly registers only itself
        for module in FAMILY_MODULES:
            importlib.import_module(f"studio.families.{module}")
    return _REGISTRY


def all_families(task: str | None = None) -> list[Family]:
    return [f for f in _families().values() if task is None or f.task == task]


def family_names() -> list[str]:
    return list(_families())


def get_family(name: str) -> Family:
    try:
        return _families()[name]
    except KeyError:
        raise StudioError(f"Unknown model family '{name}'. Known: {', '.join(family_names())}.") from None


def supported_text(task: str = IMAGE_TASK) -> str:
    """'SD1.5, SDXL and Flux.1' — for messages that say what is supported."""
    labels = [f.label for f in all_families(task)]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"


def family_of_pipeline_class(cls_name: str) -> Family | None:
    return next((f for f in all_families(IMAGE_TASK) if cls_name in f.pipeline_classes), None)


def family_of_shapes(shapes: Shapes, name: str) -> Family | None:
    """The image family whose checkpoint layout `shapes` has (a family may raise StudioError for a layout of its own
    that it does not support, e.g. an inpainting model)."""
    return next((f for f in all_families(IMAGE_TASK) if f.recognise and f.recognise(shapes, name)), None)


def detect_family(task_type: str, base_model: str) -> Family:
    """The family of a run, cheaply (no weights read): images → from model_index.json, a single file's header, or
    the hub id's name (SD1.5 when nothing says otherwise); text runs → the LLM family, unless the files say the
    model is an image model (then a StudioError that says to switch task_type)."""
    images = all_families(IMAGE_TASK)
    found = _image_family_of_files(Path(base_model or "").expanduser())
    if task_type == TEXT_TASK:
        if found is not None:
            raise StudioError(f"base_model {base_model} is a {found.label} image model, but task_type is "
                              f"{TEXT_TASK}. Set task_type: {IMAGE_TASK} to train an image LoRA on it, or give a "
                              "causal language model (a transformers folder or hub id) for a text LoRA.")
        return all_families(TEXT_TASK)[0]
    if found is not None:
        return found
    name = str(base_model).lower()
    # the most specific hint wins: "flux.2-klein" over Flux.1's "flux"
    hinted = [(len(hint), f) for f in images for hint in f.name_hints if hint in name]
    return max(hinted, key=lambda found: found[0])[1] if hinted else images[0]


def _image_family_of_files(path: Path, fallback: bool = True) -> Family | None:
    """The family the files name; a diffusers folder of a pipeline no family lists is SD1.5-like (`fallback`)."""
    if path.is_dir() and (path / "model_index.json").is_file():
        cls = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        return family_of_pipeline_class(cls) or (all_families(IMAGE_TASK)[0] if fallback else None)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from studio.models.single_file import detect_family as from_header  # reads the header only
        try:
            return from_header(path)
        except StudioError:
            return None
    return None


def resolve_family(cfg) -> Family:
    """The run's family: its `model_family`, or detected from the task and the model's files for 'auto'. A family the
    model's files contradict is refused here: planned or loaded as the wrong family, it fails deep inside."""
    if cfg.model_family == AUTO:
        return detect_family(cfg.task_type, cfg.base_model)
    family = get_family(cfg.model_family)
    found = _image_family_of_files(Path(cfg.base_model or "").expanduser(), fallback=False)
    if found is not None and found is not family:
        raise StudioError(f"base_model {cfg.base_model} is of the {found.label} family, but model_family is "
                          f"{family.name} ({family.label}; a preset may set it). Pick a {family.label} base model, "
                          f"or set model_family: {found.name} (or auto).")
    return family


def _attr(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
