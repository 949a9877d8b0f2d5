"""diffusers UNet names → the original (LDM / compvis) layout A1111, Forge and ComfyUI checkpoints use.

The reverse of diffusers' single-file conversion (what its old `convert_diffusers_to_original_stable_diffusion.py` /
`convert_diffusers_to_original_sdxl.py` scripts did), written generically from the UNet config so it works for tiny
and full-size models. The demo writes checkpoints with it; the export self-test reads LoRA keys named after it, and
checks each name against diffusers' own conversion before trusting it.
"""

from __future__ import annotations

import torch

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_prefix_map(config: dict) -> tuple[dict[str, str], set[str]]:
    """diffusers prefix → LDM prefix, and the set of LDM prefixes that are resnets (their inner names change too)."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError("per-block layers_per_block lists are not supported")
    n = len(config["down_block_types"])
    prefixes: dict[str, str] = dict(_UNET_TOP)
    resnets: set[str] = set()

    def res(hf: str, ldm: str) -> None:
        prefixes[hf] = ldm
        resnets.add(hf)

    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            res(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.")
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < n - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
        for j in range(per + 1):
            k = i * (per + 1) + j
            res(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.")
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
        if i < n - 1:
            has_attn = "CrossAttn" in config["up_block_types"][i]
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}."
    res("mid_block.resnets.0.", "middle_block.0.")
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    res("mid_block.resnets.1.", "middle_block.2.")
    return prefixes, resnets


def rename(sd: dict[str, torch.Tensor], prefixes: dict[str, str], inner: dict[str, dict[str, str]],
            what: str) -> dict[str, torch.Tensor]:
    # Longest prefix first, so "up_blocks.1.resnets.1." never matches as "up_blocks.1.resnets.1" of "...resnets.10.".
    order = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, value in sd.items():
        hf = next((p for p in order if key.startswith(p)), None)
        if hf is None:
            raise ValueError(f"{what}: no original-layout name for {key!r}")
        rest = key[len(hf):]
        head, _, tail = rest.partition(".")
        rest = inner.get(hf, {}).get(head, head) + ("." + tail if tail else "")
        out[prefixes[hf] + rest] = value
    return out


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes, resnets = _unet_prefix_map(config)
    out = rename(sd, prefixes, {p: _UNET_RESNET for p in resnets}, "unet")
    return {"model.diffusion_model." + k: v for k, v in out.items()}
