"""Image LoRAs in the kohya / LyCORIS key format: the `.safetensors` SD WebUI, Forge and ComfyUI load as
`<lora:name:0.8>`.

Keys are `lora_unet_<module_path_with_underscores>.<tensor>` (`lora_te_` for the SD1.5 text encoder, `lora_te1_`/
`lora_te2_` for SDXL's two), where the tensor is `lora_down.weight` / `lora_up.weight` (LoRA, LoCon), plus
`dora_scale` (DoRA), or LyCORIS' `hada_w1_a`… (LoHa) and `lokr_w1`… (LoKr), and an `alpha` per module. diffusers'
`convert_state_dict_to_kohya` names the modules; its alpha (= rank) is replaced by the one the run trained with.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

from studio.adapters import Scaling

LORA_TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale"}
LYCORIS_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                   "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def to_kohya(peft_state: dict[str, torch.Tensor], scaling: Scaling,
             renames: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """PEFT adapter weights keyed `unet.…`, `text_encoder.…`, `text_encoder_2.…` → kohya / LyCORIS keys with the
    alpha the run trained with; `renames` are the family's prefix renames (SD1.5's one text encoder is `lora_te_`
    in WebUI, not `lora_te1_`)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_state.items():
        path, tensor = _split(key)
        modules.setdefault(path, {})[tensor] = value.detach().contiguous().cpu()
    names = _kohya_names(list(modules), renames or {})
    out = {}
    for path, tensors in modules.items():
        for tensor, value in _module_tensors(tensors, scaling).items():
            out[f"{names[path]}.{tensor}"] = value
    return out


def _module_tensors(tensors: dict[str, torch.Tensor], scaling: Scaling) -> dict[str, torch.Tensor]:
    """One module's tensors under their kohya / LyCORIS names, with the `alpha` that gives peft's scale."""
    conv = any(v.dim() == 4 for v in tensors.values())
    rank, alpha = scaling.rank_alpha(conv)
    if scaling.rslora:  # consumers scale by alpha/rank: the alpha that makes that alpha/sqrt(rank)
        alpha *= math.sqrt(rank)
    if "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        return _lokr(tensors, scaling.factor(conv))
    out = {LORA_TENSORS.get(name, name): value for name, value in tensors.items()}
    if "dora_scale" in out:  # peft keeps one magnitude per output; LyCORIS a (out, 1, …) column
        weight_dims = out["lora_down.weight"].dim()
        out["dora_scale"] = out["dora_scale"].reshape(-1, *[1] * (weight_dims - 1))
    out["alpha"] = torch.tensor(float(alpha))
    return out


def _lokr(tensors: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """LoKr: consumers scale by alpha over the rank of a low-rank factor, and by 1 when both factors are full (peft
    always by alpha/rank). So peft's factor goes into w1 and alpha is that rank: every consumer then scales by 1."""
    out = dict(tensors)
    first = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
    out[first] = out[first] * factor
    low_rank = out.get("lokr_w1_b", out.get("lokr_w2_b"))
    # With both factors full, loaders ignore alpha (and LyCORIS requires the key): 1.
    out["alpha"] = torch.tensor(float(low_rank.shape[0]) if low_rank is not None else 1.0)
    return out


def _split(key: str) -> tuple[str, str]:
    """`unet.…to_q.lora_A.weight` → (`unet.…to_q`, `lora_A.weight`)."""
    for tensor in (*LORA_TENSORS, *LYCORIS_TENSORS):
        if key.endswith("." + tensor):
            return key[:-len(tensor) - 1], tensor
    raise ValueError(f"not an adapter tensor: {key}")


def _kohya_names(paths: list[str], renames: dict[str, str]) -> dict[str, str]:
    """Module path → kohya module name, by running diffusers' conversion on one tagged LoRA key per module."""
    tagged = {f"{_with_text_model(path)}.lora_A.weight": torch.tensor([[float(i)]]) for i, path in enumerate(paths)}
    names = {}
    for key, value in convert_state_dict_to_kohya(tagged).items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            for old, new in renames.items():
                name = name.replace(old, new)
            names[paths[int(value.item())]] = name
    return names


def _with_text_model(key: str) -> str:
    """transformers v5 dropped CLIPTextModel's `text_model.` level; WebUI/kohya key names keep it."""
    for prefix in ("text_encoder.", "text_encoder_2."):
        if key.startswith(prefix + "encoder."):
            return prefix + "text_model." + key[len(prefix):]
    return key
