"""init_lora: start an image run from an existing kohya-format LoRA file, its keys mapped onto the run's own."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from studio.adapters import Scaling
from studio.errors import StudioError

ToFile = Callable[[dict[str, torch.Tensor], Scaling], dict[str, torch.Tensor]]  # the recipe's export conversion


def read_init_lora(path: Path, ours: dict[str, torch.Tensor], to_file: ToFile, cfg) -> dict[str, torch.Tensor]:
    """The run's adapter state (peft keys of `ours`) from the file at `path`: its keys matched by converting ours the
    way the export does, its alpha/rank folded in for this run's alpha/rank."""
    if path.suffix != ".safetensors":
        raise StudioError(f"init_lora {path} must be a .safetensors LoRA file.")
    theirs = load_file(str(path))
    kohya_of = file_names(ours, to_file)
    extra = sorted({k.split(".")[0] for k in theirs} - {k.split(".")[0] for k in kohya_of.values()})
    if extra:
        raise StudioError(f"init_lora {path.name} has LoRA weights for {len(extra)} module(s) this run does not "
                          f"train (e.g. {extra[0]}). Use the target_modules / train_text_encoder it was "
                          "trained with.")
    loaded, missing = {}, []
    for peft_key, kohya_key in kohya_of.items():
        if kohya_key not in theirs:
            missing.append(kohya_key)
            continue
        weight = theirs[kohya_key]
        if weight.shape != ours[peft_key].shape:
            rank = weight.shape[0] if ".lora_down." in kohya_key or ".lora_A." in kohya_key else weight.shape[1]
            raise StudioError(f"init_lora {path.name}: {kohya_key} has shape {tuple(weight.shape)}, this run "
                              f"expects {tuple(ours[peft_key].shape)}. Set lora_rank to the file's rank "
                              f"({rank}).")
        # Fold the file's alpha/rank into lora_up so the product matches under this run's alpha/rank (a file
        # without alpha keys, e.g. Flux's diffusers layout, has its scale folded in already: alpha = rank).
        if ".lora_up." in kohya_key or ".lora_B." in kohya_key:
            base = kohya_key.split(".lora_")[0]
            rank = weight.shape[1]
            their_scale = float(theirs.get(f"{base}.alpha", torch.tensor(rank))) / rank
            weight = weight * (their_scale / (cfg.effective_alpha / cfg.lora_rank))
        loaded[peft_key] = weight
    if missing:
        raise StudioError(f"init_lora {path.name} lacks {len(missing)} of this run's LoRA weights (e.g. "
                          f"{missing[0]}). Train with the same target_modules/train_text_encoder as that LoRA.")
    return loaded


def file_names(peft_state: dict[str, torch.Tensor], to_file: ToFile) -> dict[str, str]:
    """peft key → key in the exported file, found by running the real conversion on tensors tagged with their
    index (scale 1: the tags pass through unchanged)."""
    keys = list(peft_state)
    tagged = {k: torch.full((1, 1), float(i)) for i, k in enumerate(keys)}
    converted = to_file(tagged, Scaling(rank=1, alpha=1.0))
    return {keys[int(v.item())]: k for k, v in converted.items() if not k.endswith(".alpha")}
