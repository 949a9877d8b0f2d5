"""The base model as the planner sees it: built on the meta device from its config files, never its weights.

Where the configs come from, in order: a local diffusers / transformers folder; for a single-file checkpoint, the
configs shipped for its family (read from the file's header); a hub id already in the local Hugging Face cache;
else the family's reference model (shipped configs), and the plan says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.families import Family, get_family
from studio.models.single_file import detect_family, is_single_file

LLM_REFERENCE = get_family("llm").config_path


@dataclass(frozen=True)
class ModelSource:
    """Where a base model's configs are read from, and how the plan names that source."""
    folder: Path  # holds model_index.json + component folders (images) or config.json (LLMs)
    note: str  # e.g. "from the model's config files", "sized as the reference SDXL (not in the local cache)"


def image_source(base_model: str, family: Family, *, allow_unsafe_pickle: bool = False) -> ModelSource:
    """`allow_unsafe_pickle`: the run's opt-in, which a pickle single file (.ckpt) needs here as in training."""
    path = Path(base_model or "").expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return ModelSource(path, "sizes from the model's config files")
    if path.is_file() and is_single_file(path):
        family = detect_family(path, allow_unsafe_pickle=allow_unsafe_pickle)  # safetensors: the header only
        return ModelSource(family.config_path, f"sizes of the {family.label} architecture (from the file header)")
    cached = _hub_cached(base_model, "model_index.json")
    if cached:
        return ModelSource(cached, "sizes from the model's config files (local hub cache)")
    return ModelSource(family.config_path, f"sized as the reference {family.label} model (its configs are "
                                           "not available offline)")


def llm_source(base_model: str) -> ModelSource:
    path = Path(base_model or "").expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path, "sizes from the model's config.json")
    cached = _hub_cached(base_model, "config.json")
    if cached:
        return ModelSource(cached, "sizes from the model's config.json (local hub cache)")
    return ModelSource(LLM_REFERENCE, "sized as Llama 3.1 8B (the model's config.json is not available offline)")


def _hub_cached(repo_id: str, filename: str) -> Path | None:
    """The folder of a hub snapshot in the local cache that holds `filename`; never a download."""
    if not repo_id or repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        return None
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudioError(f"Cannot read {path} to plan the run: {exc}") from None


def build_image_components(source: ModelSource) -> dict[str, torch.nn.Module]:
    """The pipeline's model components (denoiser, VAE, text encoders) on the meta device, by model_index.json name."""
    index = _read_json(source.folder / "model_index.json")
    parts = {}
    for name, entry in index.items():
        library, cls_name = (entry if isinstance(entry, list) else [None, None])[:2]
        if library not in ("diffusers", "transformers") or not (source.folder / name / "config.json").is_file():
            continue  # schedulers, tokenizers, absent components
        config = _read_json(source.folder / name / "config.json")
        cls = getattr(__import__(library), cls_name)
        with torch.device("meta"):
            parts[name] = cls.from_config(config) if library == "diffusers" else cls(cls.config_class.from_dict(config))
    return parts


def build_llm(source: ModelSource) -> torch.nn.Module:
    """The causal LM on the meta device, with SDPA attention (what training uses on CUDA)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(source.folder))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def param_count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0
