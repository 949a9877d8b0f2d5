"""A tiny random-weight Chroma pipeline, built in seconds, no download: the real ChromaTransformer2DModel (one double-
and one single-stream block, a 2-layer distilled_guidance_layer; every name as at full size), Flux's 16-channel VAE
layout, and a small T5 encoder with its word-level tokenizer (studio/demo/flux.py's). A 64 px image is a 4×4 grid of
packed latent tokens, as at full size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from studio.demo.flux import T5_WIDTH, build_t5_tokenizer, flux_scheduler, tiny_flux_vae, tiny_t5


def tiny_chroma_transformer() -> ChromaTransformer2DModel:
    return ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                                    approximator_hidden_dim=32, approximator_layers=2)


def build_tiny_chroma(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    pipe = ChromaPipeline(scheduler=flux_scheduler(), vae=tiny_flux_vae(), text_encoder=tiny_t5(),
                          tokenizer=build_t5_tokenizer(), transformer=tiny_chroma_transformer())
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src", ignore_errors=True)
    return out_dir


def write_chroma_checkpoint(pipeline_dir: str | Path, out_file: str | Path, prefix: str = "") -> Path:
    """The transformer of a diffusers Chroma folder as one `.safetensors` in the layout Chroma's own files have
    (BFL's names, the guidance layer's in_layer / out_layer / norms.N.scale), under `prefix` (ComfyUI's
    `model.diffusion_model.` for a saved checkpoint). The inverse of studio.families.chroma.to_diffusers."""
    from safetensors.torch import save_file

    from studio.demo.single_file import _weights

    tensors = chroma_file_layout(_weights(Path(pipeline_dir) / "transformer"), prefix)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file), metadata={"format": "pt"})
    return Path(out_file)


def chroma_file_layout(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers ChromaTransformer2DModel state dict in Chroma's file layout, under `prefix`. Any width; meta
    tensors too."""
    from studio.demo.flux_single_file import transformer_to_bfl

    sd, guidance = dict(sd), {}
    for key in [k for k in sd if k.startswith("distilled_guidance_layer.")]:
        name = key.replace(".linear_1.", ".in_layer.").replace(".linear_2.", ".out_layer.")
        guidance[prefix + (name.replace(".weight", ".scale") if ".norms." in name else name)] = sd.pop(key)
    return {**guidance, **transformer_to_bfl(sd, prefix)}
