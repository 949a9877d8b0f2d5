"""Write a diffusers SD1.5/SDXL pipeline folder out as one original-layout checkpoint, as A1111/ComfyUI users have them.

The reverse of diffusers' single-file conversion (what its old `convert_diffusers_to_original_stable_diffusion.py` /
`convert_diffusers_to_original_sdxl.py` scripts did), written generically from the UNet/VAE configs so it works for the
tiny demo models and for full-size ones:

  SD1.5  model.diffusion_model.*  first_stage_model.*  cond_stage_model.transformer.text_model.*
  SDXL   model.diffusion_model.*  first_stage_model.*  conditioner.embedders.0.transformer.text_model.*   (CLIP-L)
                                                       conditioner.embedders.1.model.*   (OpenCLIP layout, CLIP-G)

Used by the tests and the demo to produce realistic `.safetensors` / `.ckpt` files without any download.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio.models.ldm_layout import rename, unet_to_ldm

# ------------------------------------------------------------------------------------------------------------ VAE

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    per = config.get("layers_per_block", 2)
    prefixes = {f"{part}.{name}.": f"{part}.{name}."
                for part in ("encoder", "decoder") for name in ("conv_in", "conv_out")}
    prefixes.update({"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
                     "quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."})
    resnet_inner = {"conv_shortcut": "nin_shortcut"}
    inner: dict[str, dict[str, str]] = {}
    for i in range(n):
        for j in range(per):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(per + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    for part in ("encoder", "decoder"):
        for j in range(2):
            prefixes[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        inner[f"{part}.mid_block.attentions.0."] = _VAE_ATTN
    for p in prefixes:
        if ".resnets." in p:
            inner[p] = resnet_inner
    out = rename(sd, prefixes, inner, "vae")
    fixed = {}
    for key, value in out.items():
        key = key.replace(".proj_out.0.", ".proj_out.")  # to_out.0 → proj_out
        # The original VAE attention uses 1×1 convolutions where diffusers uses linear layers.
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        fixed["first_stage_model." + key] = value
    return fixed


# ----------------------------------------------------------------------------------------------------- text models

def clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict under `prefix` with the `text_model.` level real checkpoints have."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict in open_clip's layout (SDXL's second text encoder)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        # open_clip multiplies x @ text_projection; a Linear stores the transpose.
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0)
            for hf, oc in _OPENCLIP_LAYER.items():
                out[dst + f"{oc}.{kind}"] = sd.pop(src + f"{hf}.{kind}")
    if sd:
        raise ValueError(f"text_encoder_2: no open_clip name for {sorted(sd)[:5]}")
    return {prefix + k: v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------- pipeline

def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return load_file(folder / name)
    raise FileNotFoundError(f"no .safetensors weights in {folder}")


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def components_to_ldm(unet: dict[str, torch.Tensor], unet_config: dict, vae: dict[str, torch.Tensor],
                      vae_config: dict, text_encoder: dict[str, torch.Tensor],
                      text_encoder_2: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One original-layout state dict from diffusers/transformers component state dicts (SDXL when
    `text_encoder_2` is given, else SD1.5). Works on meta tensors too (names and shapes only)."""
    sd = unet_to_ldm(unet, unet_config)
    sd.update(vae_to_ldm(vae, vae_config))
    if text_encoder_2 is not None:
        sd.update(clip_to_ldm(text_encoder, "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(text_encoder_2, "conditioner.embedders.1.model."))
    else:
        sd.update(clip_to_ldm(text_encoder, "cond_stage_model.transformer."))
    return {k: v.contiguous() for k, v in sd.items()}


def pipeline_to_ldm(pipeline_dir: str | Path) -> dict[str, torch.Tensor]:
    """The original single-file state dict of a saved diffusers SD1.5 or SDXL pipeline folder."""
    root = Path(pipeline_dir)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    sdxl = index["_class_name"].startswith("StableDiffusionXL")
    return components_to_ldm(_weights(root / "unet"), _config(root / "unet"), _weights(root / "vae"),
                             _config(root / "vae"), _weights(root / "text_encoder"),
                             _weights(root / "text_encoder_2") if sdxl else None)


def write_single_file(pipeline_dir: str | Path, out_path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Save `pipeline_dir` as one checkpoint: `.safetensors`, or a pickle (`.ckpt`/`.pt`/`.pth`/`.bin`) holding
    `{"state_dict": ..., "global_step": 0}` like the original training checkpoints. Returns `out_path`."""
    out_path = Path(out_path)
    sd = pipeline_to_ldm(pipeline_dir)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        save_file(sd, str(out_path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": sd, "global_step": 0}, out_path)
    return out_path
