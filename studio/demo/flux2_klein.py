"""A tiny random-weight FLUX.2 [klein] pipeline (base, not distilled), built in seconds, no download: the real
Flux2Transformer2DModel (one double- and one single-stream block; every name as at full size), the FLUX.2 VAE with its
batch-norm statistics at toy width, and a 28-layer, 8-wide Qwen3 (the pipeline stacks hidden states 9, 18 and 27)
with studio/demo/z_image.py's chat tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from studio.demo.z_image import build_qwen_tokenizer

QWEN_WIDTH = 8
# BFL name → diffusers name, per block kind (the inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers)
GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
          "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
          "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
          "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
          "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
          "single_stream_modulation.lin": "single_stream_modulation.linear"}
DOUBLE = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
          "img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
          "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
          "txt_attn.proj": "attn.to_add_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out", "norm.query_norm": "attn.norm_q",
          "norm.key_norm": "attn.norm_k"}
FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def tiny_flux2_transformer() -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * QWEN_WIDTH,
                                   timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=False)


def build_tiny_flux2_klein(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=QWEN_WIDTH, intermediate_size=16,
                                         num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=4, max_position_embeddings=1024))
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1,
                             latent_channels=32)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen3, tokenizer=tokenizer,
                              transformer=tiny_flux2_transformer(), is_distilled=False)
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src", ignore_errors=True)
    return out_dir


def flux2_file_layout(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Flux2Transformer2DModel state dict in BFL's layout (ComfyUI's flux-2-klein files). Any width."""
    from studio.models.flux_keys import swap_halves

    sd, out = dict(sd), {}
    for index in {k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")}:
        hf, bfl = f"transformer_blocks.{index}.", f"double_blocks.{index}."
        for fused, parts in FUSED.items():
            out[bfl + fused + ".weight"] = torch.cat([sd.pop(f"{hf}{p}.weight") for p in parts])
        out.update(_renamed(sd, DOUBLE, hf, bfl))
    for index in {k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")}:
        out.update(_renamed(sd, SINGLE, f"single_transformer_blocks.{index}.", f"single_blocks.{index}."))
    out.update(_renamed(sd, GLOBAL, "", ""))
    out["final_layer.adaLN_modulation.1.weight"] = swap_halves(sd.pop("norm_out.linear.weight"))
    if sd:
        raise ValueError(f"transformer: no BFL name for {sorted(sd)[:5]}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def _renamed(sd: dict, names: dict[str, str], hf: str, bfl: str) -> dict:
    out = {}
    for theirs, ours in names.items():
        for part in ("weight", "bias"):
            if f"{hf}{ours}.{part}" in sd:
                norm = part == "weight" and "norm" in theirs and "modulation" not in theirs
                out[f"{bfl}{theirs}.{'scale' if norm else part}"] = sd.pop(f"{hf}{ours}.{part}")
    return out


def write_flux2_checkpoint(pipeline_dir: str | Path, out_file: str | Path, prefix: str = "") -> Path:
    from safetensors.torch import save_file

    from studio.demo.single_file import _weights

    tensors = flux2_file_layout(_weights(Path(pipeline_dir) / "transformer"), prefix)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata={"format": "pt"})
    return Path(out_file)
