"""FLUX.2 [klein] (4 B and 9 B, distilled and base, and fine-tunes that keep the layout): FLUX.2's rectified-flow
transformer (double-stream blocks with shared modulation, single-stream blocks with one fused qkv+MLP projection)
over 2×2-patchified 32-channel latents of the FLUX.2 VAE, normalised by the VAE's batch-norm statistics (128
channels per token), conditioned on Qwen3's hidden states 9, 18 and 27 stacked (Qwen3-4B for 4 B, Qwen3-8B for 9 B).

Trained as Flux2KleinPipeline samples: x_t = (1 − σ)·x0 + σ·noise, the transformer is given σ and predicts
noise − x0; σ drawn logit-normal and shifted by the pipeline's own empirical mu for the image's token count (at the
base model's 50 steps).

Default LoRA targets, as ai-toolkit's and musubi-tuner's FLUX.2 networks adapt the transformer blocks: the
double-stream blocks' attention and MLPs and the single-stream blocks' fused qkv+MLP input projection (their output
projection `attn.to_out` shares its suffix with the double blocks' `to_out` list, so it is left out by default).

Exported in diffusers' `transformer.…lora_A/lora_B` names: ComfyUI's Flux2 model class derives from its Flux one,
whose key map (comfy/utils.py flux_to_diffusers) resolves ff.linear_in / linear_out and to_qkv_mlp_proj onto
img_mlp / linear1; Flux2KleinPipeline loads the same keys.
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

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's prompt length
TRAIN_SCHEDULE_STEPS = 50  # the base model's sampling steps: the shift the training sigmas follow
MARKER = "single_stream_modulation.lin.weight"  # diffusers' and ComfyUI's test for a FLUX.2 file
KLEIN_9B_TEXT = 3 * 4096  # joint_attention_dim of 9 B (Qwen3-8B); 4 B's is 3 × 2560


class Flux2KleinRecipe(FluxRecipe):
    """Training specifics of FLUX.2 klein. Flux.1's checks, export and block list carry over."""
    label = "FLUX.2 klein"
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out", "to_qkv_mlp_proj")

    def max_sequence_length(self, pipe) -> int:
        return MAX_SEQUENCE_LENGTH

    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latents patchified 2×2 and batch-normalised, as Flux2KleinPipeline encodes reference images."""
        import torch
        from diffusers import Flux2KleinPipeline

        latents = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return (latents - mean) / std

    def encode_text(self, pipe, captions: list[str], device) -> tuple[torch.Tensor, None]:
        embeds, _ = pipe.encode_prompt(prompt=list(captions), device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return embeds, None

    def prompt_inputs(self, pipe, prompt: str, device) -> dict:
        inputs = {"prompt_embeds": self.encode_text(pipe, [prompt], device)[0]}
        if not pipe.config.is_distilled:  # the base model samples with real guidance
            inputs["negative_prompt_embeds"] = self.encode_text(pipe, [""], device)[0]
        return inputs

    def sigmas(self, scheduler, rng: torch.Generator, batch: int, tokens: int) -> torch.Tensor:
        import math

        import torch
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        u = torch.sigmoid(torch.randn(batch, generator=rng))
        mu = compute_empirical_mu(tokens, TRAIN_SCHEDULE_STEPS)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))

    def loss(self, engine, latents: torch.Tensor, embeds: torch.Tensor, pooled, conditioning,
             rng: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F
        from diffusers import Flux2KleinPipeline as Pipe

        from studio.hardware import to_device

        device = engine.device
        bsz, _, height, width = latents.shape
        noise = to_device(torch.randn(latents.shape, generator=rng), device, latents.dtype)
        sigmas = to_device(self.sigmas(engine.noise_scheduler, rng, bsz, height * width), device)
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        embeds = embeds.to(device)
        pred = engine.denoiser(hidden_states=Pipe._pack_latents(noisy), timestep=sigmas.to(latents.dtype),
                               guidance=None, encoder_hidden_states=embeds,
                               txt_ids=Pipe._prepare_text_ids(embeds).to(device),
                               img_ids=Pipe._prepare_latent_ids(noisy).to(device), return_dict=False)[0]
        return F.mse_loss(pred.float(), Pipe._pack_latents(noise - latents).float())

    def text_shape(self, transformer) -> tuple[int, int]:
        return MAX_SEQUENCE_LENGTH, transformer.config.joint_attention_dim

    def meta_inputs(self, transformer, latent_side: int, embeds: torch.Tensor, dtype: torch.dtype) -> dict:
        import torch

        side = latent_side // 2
        return {"hidden_states": torch.empty(1, side * side, transformer.config.in_channels, dtype=dtype,
                                             device="meta"),
                "timestep": torch.empty(1, dtype=dtype, device="meta"), "guidance": None,
                "encoder_hidden_states": embeds,
                "txt_ids": torch.empty(1, embeds.shape[1], 4, dtype=torch.long, device="meta"),
                "img_ids": torch.empty(1, side * side, 4, dtype=torch.long, device="meta")}

    def modelspec_architecture(self, pipe) -> str:
        """musubi-tuner's ModelSpec names: "Flux.2-klein-9b" or "Flux.2-klein-4b", told apart by the text width."""
        return "Flux.2-klein-9b" if pipe.transformer.config.joint_attention_dim == KLEIN_9B_TEXT else "Flux.2-klein-4b"

    def sampling(self, pipe) -> dict:
        """The model cards: distilled 4 steps at guidance 1 (no CFG); base 50 steps at guidance 4."""
        distilled = pipe.config.is_distilled
        return {"num_inference_steps": 4 if distilled else 50, "guidance_scale": 1.0 if distilled else 4.0,
                "max_sequence_length": MAX_SEQUENCE_LENGTH}


def recognise(shapes: Shapes, name: str) -> bool:
    from studio.errors import StudioError
    from studio.models.transformer_single_file import transformer_shapes

    t = transformer_shapes(shapes)
    if MARKER not in t:
        return False
    if "guidance_in.in_layer.weight" in t:
        raise StudioError(f"base_model: {name} is FLUX.2 [dev] (32 B, guidance-distilled, Mistral text encoder), "
                          "which LoRA Studio does not train. Use FLUX.2 [klein] 4B / 9B (distilled or base).")
    return True


# --- single-file checkpoints (ComfyUI models/diffusion_models/flux-2-klein-4b.safetensors, BFL layout) -------------

def to_diffusers(sd: dict) -> dict:
    """BFL's FLUX.2 names → diffusers' through diffusers' own converter (qkv split in three at any width)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(sd)


def config_overrides(t: Shapes) -> dict:
    """Config values read from a file's shapes: 4 B or 9 B, a pruned fine-tune, the tiny test model."""
    inner, in_channels = t["img_in.weight"]
    head = t["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return {"num_layers": _count(t, "double_blocks."), "num_single_layers": _count(t, "single_blocks."),
            "attention_head_dim": head, "num_attention_heads": inner // head, "in_channels": in_channels,
            "joint_attention_dim": t["txt_in.weight"][1], "mlp_ratio": t["double_blocks.0.img_mlp.2.weight"][1] / inner,
            "timestep_guidance_channels": t["time_in.in_layer.weight"][1]}


def _count(t: Shapes, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in t if k.startswith(prefix)})


load_single_file = TransformerFile(label="FLUX.2 klein", pipeline="Flux2KleinPipeline",
                                   transformer="Flux2Transformer2DModel",
                                   config_dir=CONFIG_ROOT / "flux2-klein-4b",
                                   default_components="black-forest-labs/FLUX.2-klein-4B", to_diffusers=to_diffusers,
                                   overrides=config_overrides)


register(Family(
    name="flux2_klein", label="FLUX.2 klein", task=IMAGE_TASK, engine="studio.engines.diffusion:DiffusionEngine",
    recipe="studio.families.flux2_klein:Flux2KleinRecipe", pipeline_classes=("Flux2KleinPipeline",),
    recognise=recognise, single_file_loader="studio.families.flux2_klein:load_single_file",
    name_hints=("flux.2-klein", "flux2-klein", "flux-2-klein", "flux2_klein", "klein"), config_dir="flux2-klein-4b",
    native_resolution=1024, trains_text_encoder=False, quantized_base=("fp8", "nf4"),
    # musubi-tuner's ModelSpec (ARCH_FLUX_2_KLEIN_4B / _9B, IMPL_FLUX_2; the size from the model) and network module
    webui_version="flux2_klein", network_module="networks.lora_flux_2", modelspec_architecture="Flux.2-klein-4b",
    modelspec_implementation="https://github.com/black-forest-labs/flux2", lora_loaders=("ComfyUI", "diffusers"),
    lora_markers=("transformer.transformer_blocks.", "transformer.single_transformer_blocks.", "double_blocks."),
    preset_values={"learning_rate": 1e-4, "lora_rank": 16, "lora_alpha": None, "shuffle_tags": False},
))
