"""Write a diffusers Flux pipeline folder's transformer as one BFL-layout `.safetensors`, as ComfyUI / Forge users keep
Flux.1 (flux1-dev.safetensors in models/unet/), or with `full=True` as a ComfyUI full checkpoint:

  model.diffusion_model.*                 the transformer, BFL layout (double_blocks.*, single_blocks.*, img_in …)
  vae.*                                   the VAE, LDM layout (encoder.down.0.block.0 …)
  text_encoders.clip_l.transformer.*      CLIP-L, transformers layout (text_model.encoder.layers …)
  text_encoders.t5xxl.transformer.*       T5 encoder, transformers layout (encoder.block …, shared.weight)

The transformer conversion is the exact inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
(fused q/k/v, `linear1` = q|k|v|mlp, the final AdaLN's shift/scale order); the VAE and CLIP ones are the SD writer's
(studio/demo/single_file.py). Used by the tests and the demo to produce realistic Flux files without any download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.demo.single_file import _config, _weights, clip_to_ldm, vae_to_ldm
from studio.models.flux_keys import block_count, flux_names, swap_halves
from studio.models.flux_single_file import CLIP, T5, TRANSFORMER, VAE


def transformer_to_bfl(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in BFL's original layout, under `prefix`. Any width; works on
    meta tensors too. ValueError for a weight it has no BFL name for."""
    sd = dict(sd)
    renames, fused, swapped = flux_names(block_count(sd, "transformer_blocks."),
                                          block_count(sd, "single_transformer_blocks."),
                                          "time_text_embed.guidance_embedder.linear_1.weight" in sd,
                                          modulated="transformer_blocks.0.norm1.linear.weight" in sd)
    out = {bfl: sd.pop(hf) for hf, bfl in renames.items()}
    for bfl, parts in fused.items():
        out[bfl] = torch.cat([sd.pop(hf) for hf in parts], dim=0)
    out.update({bfl: swap_halves(sd.pop(hf)) for hf, bfl in swapped.items()})
    if sd:
        raise ValueError(f"transformer: no BFL name for {sorted(sd)[:5]}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_flux_checkpoint(pipeline_dir: str | Path, out_file: str | Path, *, full: bool = False) -> Path:
    """Save the transformer of the diffusers Flux folder `pipeline_dir` (e.g. `studio.demo.flux.build_tiny_flux`'s)
    as a bare BFL-layout `.safetensors`; with `full`, as a ComfyUI full checkpoint that also holds the VAE and both
    text encoders. Returns `out_file`."""
    root, out_file = Path(pipeline_dir), Path(out_file)
    transformer = _weights(root / "transformer")
    if not full:
        sd = transformer_to_bfl(transformer)
    else:
        sd = transformer_to_bfl(transformer, TRANSFORMER)
        vae = vae_to_ldm(_weights(root / "vae"), _config(root / "vae"))
        sd.update({VAE + k.removeprefix("first_stage_model."): v for k, v in vae.items()})
        sd.update(clip_to_ldm(_weights(root / "text_encoder"), CLIP))
        sd.update({T5 + k: v for k, v in _weights(root / "text_encoder_2").items()})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out_file), metadata={"format": "pt"})
    return out_file
