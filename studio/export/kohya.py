"""Image LoRAs in the kohya/A1111 key format: the `.safetensors` SD WebUI and ComfyUI load as `<lora:name:0.8>`.

Keys are `lora_unet_<module_path_with_underscores>.lora_down.weight / .lora_up.weight / .alpha` (`lora_te_` for the
SD1.5 text encoder, `lora_te1_`/`lora_te2_` for SDXL's two). diffusers' `convert_state_dict_to_kohya` does the key
mapping; it writes alpha = rank, so the real `lora_alpha` is written over it (else the strength is off).
"""

from __future__ import annotations

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya


def to_kohya(peft_state: dict[str, torch.Tensor], alpha: float,
             renames: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """PEFT LoRA weights keyed `unet.…`, `text_encoder.…`, `text_encoder_2.…` → kohya keys with the true alpha;
    `renames` are the family's prefix renames (SD1.5's one text encoder is `lora_te_` in WebUI, not `lora_te1_`)."""
    kohya = convert_state_dict_to_kohya({_with_text_model(k): v for k, v in peft_state.items()})
    out = {}
    for key, value in kohya.items():
        for old, new in (renames or {}).items():
            key = key.replace(old, new)
        out[key] = torch.tensor(float(alpha)) if key.endswith(".alpha") else value.detach().contiguous().cpu()
    return out


def _with_text_model(key: str) -> str:
    """transformers v5 dropped CLIPTextModel's `text_model.` level; WebUI/kohya key names keep it."""
    for prefix in ("text_encoder.", "text_encoder_2."):
        if key.startswith(prefix + "encoder."):
            return prefix + "text_model." + key[len(prefix):]
    return key
