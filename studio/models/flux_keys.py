"""Flux.1 transformer weights between BFL's original layout (the single files ComfyUI and Forge users keep) and
diffusers' names, for any width: the name map of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`,
which itself assumes FLUX.1's 3072-wide blocks."""

from __future__ import annotations

from typing import Any


def flux_names(num_layers: int, num_single_layers: int, guidance: bool, modulated: bool = True):
    """How diffusers' FluxTransformer2DModel names map to BFL's (the mapping of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers`): `renames` diffusers → BFL for tensors that only change name;
    `fused` BFL → the diffusers tensors it concatenates along dim 0 (q, k, v [, mlp]); `swapped` diffusers → BFL
    for the final AdaLN projection, whose two halves (shift, scale in BFL) diffusers stores as (scale, shift).
    `modulated` False: Chroma's layout, which has none of the modulation layers nor the time / vector embedders (its
    distilled_guidance_layer computes all modulations; studio/families/chroma.py maps that)."""
    renames: dict[str, str] = {}

    def linear(hf: str, bfl: str) -> None:
        renames[f"{hf}.weight"] = f"{bfl}.weight"
        renames[f"{hf}.bias"] = f"{bfl}.bias"

    if modulated:
        linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
        linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
        linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
        linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if guidance:
        linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    linear("context_embedder", "txt_in")
    linear("x_embedder", "img_in")
    fused: dict[str, list[str]] = {}
    for i in range(num_layers):
        hf, bfl = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        if modulated:
            linear(hf + "norm1.linear", bfl + "img_mod.lin")
            linear(hf + "norm1_context.linear", bfl + "txt_mod.lin")
        for part in ("weight", "bias"):
            fused[f"{bfl}img_attn.qkv.{part}"] = [f"{hf}attn.to_{p}.{part}" for p in "qkv"]
            fused[f"{bfl}txt_attn.qkv.{part}"] = [f"{hf}attn.add_{p}_proj.{part}" for p in "qkv"]
        renames[hf + "attn.norm_q.weight"] = bfl + "img_attn.norm.query_norm.scale"
        renames[hf + "attn.norm_k.weight"] = bfl + "img_attn.norm.key_norm.scale"
        renames[hf + "attn.norm_added_q.weight"] = bfl + "txt_attn.norm.query_norm.scale"
        renames[hf + "attn.norm_added_k.weight"] = bfl + "txt_attn.norm.key_norm.scale"
        linear(hf + "ff.net.0.proj", bfl + "img_mlp.0")
        linear(hf + "ff.net.2", bfl + "img_mlp.2")
        linear(hf + "ff_context.net.0.proj", bfl + "txt_mlp.0")
        linear(hf + "ff_context.net.2", bfl + "txt_mlp.2")
        linear(hf + "attn.to_out.0", bfl + "img_attn.proj")
        linear(hf + "attn.to_add_out", bfl + "txt_attn.proj")
    for i in range(num_single_layers):
        hf, bfl = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        if modulated:
            linear(hf + "norm.linear", bfl + "modulation.lin")
        for part in ("weight", "bias"):
            fused[f"{bfl}linear1.{part}"] = [f"{hf}attn.to_{p}.{part}" for p in "qkv"] + [f"{hf}proj_mlp.{part}"]
        renames[hf + "attn.norm_q.weight"] = bfl + "norm.query_norm.scale"
        renames[hf + "attn.norm_k.weight"] = bfl + "norm.key_norm.scale"
        linear(hf + "proj_out", bfl + "linear2")
    linear("proj_out", "final_layer.linear")
    swapped = {"norm_out.linear.weight": "final_layer.adaLN_modulation.1.weight",
               "norm_out.linear.bias": "final_layer.adaLN_modulation.1.bias"} if modulated else {}
    return renames, fused, swapped


def swap_halves(t):
    """(a, b) → (b, a) along dim 0: BFL's (shift, scale) ↔ diffusers' (scale, shift). Its own inverse."""
    import torch

    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def block_count(keys, prefix: str) -> int:
    return len({k.split(".", 2)[1] for k in keys if k.startswith(prefix)})


def bfl_to_diffusers(sd: dict[str, Any]) -> dict[str, Any]:
    """BFL-layout Flux.1 transformer weights (no prefix) → diffusers names, for any width. diffusers' own converter
    does the same but assumes FLUX.1's 3072-wide blocks; this one reads the width from `img_in.weight`. Consumes
    `sd`. KeyError when a weight is missing. Chroma's layout (no modulation layers) converts too, less its
    distilled_guidance_layer."""
    inner = sd["img_in.weight"].shape[0]
    renames, fused, swapped = flux_names(block_count(sd, "double_blocks."), block_count(sd, "single_blocks."),
                                          "guidance_in.in_layer.weight" in sd,
                                          modulated="double_blocks.0.img_mod.lin.weight" in sd)
    out = {hf: sd.pop(bfl) for hf, bfl in renames.items()}
    for bfl, parts in fused.items():
        t = sd.pop(bfl)
        sizes = [inner] * 3 + ([t.shape[0] - 3 * inner] if len(parts) == 4 else [])
        # Copies, as diffusers' converter makes (torch.cat): a view would keep the whole fused tensor alive.
        out.update((hf, piece.clone()) for hf, piece in zip(parts, t.split(sizes, dim=0)))
        del t
    out.update({hf: swap_halves(sd.pop(bfl)) for hf, bfl in swapped.items()})
    return out
