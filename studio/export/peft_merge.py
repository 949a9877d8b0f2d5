"""LLM adapters as peft folders, and merging an adapter folder into its base model.

`save_adapter` writes what `PeftModel.from_pretrained(base, folder)` loads (adapter_model.safetensors,
adapter_config.json) plus the tokenizer (with the chat template the adapter was trained with).
`merge_adapter` bakes an adapter folder into a full copy of its base model — used at the end of a run
(save_merged_model) and by the studio's Export tab for any existing adapter folder.
Both write into a hidden temporary folder and rename it into place, so an interrupted export leaves no half folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from studio.models.causal_lm import load_causal_lm, load_tokenizer
from studio.errors import StudioError
from studio.fileio import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model: PeftModel, tokenizer, out_dir: str | Path, metadata: dict[str, str]) -> Path:
    """The peft adapter folder, with the run's facts (`metadata`) in the weights file's header."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # peft's own layout and config (inference mode, base model name)
        # peft writes only {"format": "pt"} as header; rewrite the (small) file with the run's metadata added.
        weights = load_file(str(tmp / ADAPTER_WEIGHTS))
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={**{k: str(v) for k, v in metadata.items()},
                                                                 "format": "pt"})
        tokenizer.save_pretrained(tmp)
    return out_dir


def adapter_base_model(adapter_dir: str | Path, base_model: str | None = None) -> str:
    """The base model for an adapter folder: `base_model` if given, else the one its adapter_config.json names."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise StudioError(f"{adapter_dir} is not a peft adapter folder (no {ADAPTER_CONFIG}). Pick the folder a "
                          "text-generation run wrote into its output_dir.")
    recorded = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not (base_model or recorded):
        raise StudioError(f"{config_path} does not name its base model. Give the base model it was trained on.")
    return base_model or recorded


def adapter_tokenizer(adapter_dir: Path, base_model: str):
    """The tokenizer saved with the adapter (it holds the chat template used in training), else the base's."""
    if (adapter_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter_dir)
    return load_tokenizer(base_model)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Base model + adapter merged into one transformers folder (`merge_and_unload`), in the base's own dtype.

    The base is loaded afresh on the CPU as stored — never the 4-bit training copy, whose merge would be lossy —
    so this needs the base model's size in RAM, not in GPU memory.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base_model = adapter_base_model(adapter_dir, base_model)
    model = load_causal_lm(base_model, dtype="auto", device=torch.device("cpu"))
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StudioError(f"The adapter {adapter_dir} does not fit the base model {base_model} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                          "Use the base it was trained on.") from None
    tokenizer = adapter_tokenizer(adapter_dir, base_model)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
