"""Chroma (lodestones' Chroma1-HD / -Base / -Flash and fine-tunes that keep the layout): Flux.1-schnell's rectified-flow
transformer with its modulation layers pruned into one `distilled_guidance_layer`, conditioned on T5-XXL alone (no
CLIP, no guidance input), with the T5 padding masked in attention. Trained like Flux.1 (the recipe derives from
FluxRecipe): flow-matching loss on 2×2-packed latents of Flux's VAE, logit-normal sigmas shifted as the scheduler
shifts them for the image's size; only the text conditioning differs.

Default LoRA targets, as kohya sd-scripts' lora_flux (model_type chroma) and diffusion-pipe's Chroma model choose
them: every Linear of the double- and single-stream blocks (attention projections and MLPs), none of the
distilled_guidance_layer ("proj_out" also names the final projection, which ComfyUI maps to final_layer.linear).

Exported in diffusers' `transformer.…lora_A/lora_B` names: ComfyUI's Chroma model class derives from its Flux one, so
comfy/lora.py maps these keys with flux_to_diffusers (one fused qkv / linear1 slice each), and ChromaPipeline loads
them with FluxLoraLoaderMixin.

The second tensor the engine caches per caption is T5's attention mask (Chroma has no pooled embedding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from studio.families import Family, Shapes, register
from studio.families.flux1 import FluxRecipe
from studio.models import CONFIG_ROOT
from studio.models.transformer_single_file import TransformerFile
from studio.tasks import IMAGE_TASK

if TYPE_CHECKING:
    import torch

MAX_SEQUENCE_LENGTH = 512  # T5 tokens per caption, as ChromaPipeline and lodestones' trainer use
MARKER = "distilled_guidance_layer.in_proj.bias"  # what ComfyUI's and diffusers' detection read as Chroma
PIXEL_SPACE_MARKER = "nerf_image_embedder.embedder.0.weight"  # Chroma Radiance: no VAE latents


class ChromaRecipe(FluxRecipe):
    """Training specifics of Chroma: Flux.1's, with T5's tokens and mask as the only conditioning."""
    label = "Chroma"
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")

    def max_sequence_length(self, pipe) -> int:
        return min(MAX_SEQUENCE_LENGTH, pipe.tokenizer.model_max_length)

    def encode_text(self, pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's embeddings and the mask ChromaPipeline gives the transformer (the first padding token stays
        visible, as Chroma was trained)."""
        embeds, _, mask, *_ = pipe.encode_prompt(prompt=captions, device=device, do_classifier_free_guidance=False,
                                                 max_sequence_length=self.max_sequence_length(pipe))
        return embeds, mask

    def prompt_inputs(self, pipe, prompt: str, device) -> dict:
        """A sample prompt and the empty negative prompt (Chroma samples with real guidance) as embeddings."""
        embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
            prompt=prompt, negative_prompt="", device=device, do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length(pipe))
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": negative,
                "negative_prompt_attention_mask": negative_mask}

    def conditions(self, transformer, mask: torch.Tensor, packed: torch.Tensor) -> dict:
        """The text mask extended over the image tokens, as ChromaPipeline._prepare_attention_mask does."""
        import torch

        image = torch.ones(packed.shape[0], packed.shape[1], device=packed.device, dtype=mask.dtype)
        return {"attention_mask": torch.cat([mask.to(packed.device), image], dim=1)}

    def text_shape(self, transformer) -> tuple[int, int]:
        return MAX_SEQUENCE_LENGTH, transformer.config.joint_attention_dim

    def meta_inputs(self, transformer, latent_side: int, embeds: torch.Tensor, dtype: torch.dtype) -> dict:
        import torch

        tokens = (latent_side // 2) ** 2
        packed = torch.empty(1, tokens, transformer.config.in_channels, dtype=dtype, device="meta")
        mask = torch.empty(1, embeds.shape[1], dtype=dtype, device="meta")
        return {"hidden_states": packed, "timestep": torch.empty(1, dtype=dtype, device="meta"),
                "encoder_hidden_states": embeds, "txt_ids": torch.empty(embeds.shape[1], 3, dtype=dtype, device="meta"),
                "img_ids": torch.empty(tokens, 3, dtype=dtype, device="meta"),
                **self.conditions(transformer, mask, packed)}

    def modelspec_architecture(self, pipe) -> str:
        return "chroma"  # kohya's sai_model_spec, for every Chroma model

    def sampling(self, pipe) -> dict:
        """Chroma1-HD's model card: ~40 steps at CFG 3.0 with a negative prompt."""
        return {"num_inference_steps": 40, "guidance_scale": 3.0,
                "max_sequence_length": self.max_sequence_length(pipe)}


def recognise(shapes: Shapes, name: str) -> bool:
    from studio.errors import StudioError
    from studio.models.transformer_single_file import transformer_shapes

    t = transformer_shapes(shapes)
    if MARKER not in t:
        return False
    if PIXEL_SPACE_MARKER in t:
        raise StudioError(f"base_model: {name} is Chroma Radiance, a pixel-space model (no VAE latents), which LoRA "
                          "Studio cannot train. Use Chroma1-HD, -Base or a fine-tune of them.")
    return True


# --- single-file checkpoints (ComfyUI models/diffusion_models/, BFL-style layout) ------------------------------------

def to_diffusers(sd: dict) -> dict:
    """A Chroma file's transformer tensors → diffusers' names: Flux.1's BFL mapping without the modulation layers
    (studio.models.flux_single_file), plus the distilled_guidance_layer's own names. Any width; consumes `sd`."""
    from studio.models.flux_keys import bfl_to_diffusers

    guidance = "distilled_guidance_layer."
    out = {}
    for key in [k for k in sd if k.startswith(guidance)]:
        name = key.replace(".in_layer.", ".linear_1.").replace(".out_layer.", ".linear_2.")
        out[name.replace(".scale", ".weight") if ".norms." in name else name] = sd.pop(key)
    return {**out, **bfl_to_diffusers(sd)}


def config_overrides(t: Shapes) -> dict:
    """Config values read from a file's shapes (a pruned fine-tune, the tiny test model)."""
    from studio.models.flux_keys import block_count

    inner, in_channels = t["img_in.weight"]
    head = t["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    hidden, channels = t["distilled_guidance_layer.in_proj.weight"]
    return {"num_layers": block_count(t, "double_blocks."), "num_single_layers": block_count(t, "single_blocks."),
            "attention_head_dim": head, "num_attention_heads": inner // head, "in_channels": in_channels,
            "joint_attention_dim": t["txt_in.weight"][1], "approximator_num_channels": channels,
            "approximator_hidden_dim": hidden,
            "approximator_layers": len({k.split(".")[2] for k in t
                                        if k.startswith("distilled_guidance_layer.layers.")})}


load_single_file = TransformerFile(label="Chroma", pipeline="ChromaPipeline", transformer="ChromaTransformer2DModel",
                                   config_dir=CONFIG_ROOT / "chroma", default_components="lodestones/Chroma1-HD",
                                   to_diffusers=to_diffusers, overrides=config_overrides)


register(Family(
    name="chroma", label="Chroma", task=IMAGE_TASK, engine="studio.engines.diffusion:DiffusionEngine",
    recipe="studio.families.chroma:ChromaRecipe", pipeline_classes=("ChromaPipeline",), recognise=recognise,
    single_file_loader="studio.families.chroma:load_single_file", name_hints=("chroma",), config_dir="chroma",
    native_resolution=1024, trains_text_encoder=False, quantized_base=("fp8", "nf4"),
    # kohya sd-scripts' network module for Chroma (its Flux trainer, model_type chroma) and sai_model_spec's
    # ARCH_FLUX_1_CHROMA / IMPL_CHROMA; ss_base_model_version "chroma", not Flux.1's "flux1": the preview tells a
    # Flux.1 LoRA from a Chroma one by it (they share key names)
    webui_version="chroma", network_module="networks.lora_flux", modelspec_architecture="chroma",
    modelspec_implementation="https://huggingface.co/lodestones/Chroma", lora_loaders=("ComfyUI", "diffusers"),
    lora_markers=("transformer.", "lora_unet_double_blocks_", "lora_unet_single_blocks_", "diffusion_model."),
    preset_values={"learning_rate": 1e-4, "lora_rank": 16, "lora_alpha": None, "shuffle_tags": False},
))
