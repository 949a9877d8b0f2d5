"""Flux.1 (dev, schnell, and fine-tunes that keep their layout): a rectified-flow transformer over 2×2-packed latents
of a 16-channel VAE, conditioned on T5-XXL token embeddings and CLIP-L's pooled embedding (dev also on a guidance
value). Trained as diffusers' Flux LoRA example and kohya sd-scripts do: flow-matching loss (predict noise − latents)
at sigmas drawn from a logit-normal and shifted for the image's size as the scheduler shifts them at inference.

The module imports no torch at the top: the registry is read by the UI at start-up; the recipe imports what it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from studio.families import Family, Shapes, register
from studio.tasks import IMAGE_TASK

if TYPE_CHECKING:
    import torch

    from studio.adapters import Scaling

TRAIN_GUIDANCE = 1.0  # dev's guidance input while training (kohya, ai-toolkit); inference uses ~3.5


class FluxRecipe:
    """Training specifics of Flux.1, for studio.engines.diffusion.DiffusionEngine (Chroma's recipe derives from it)."""
    label = "Flux.1"
    denoiser = "transformer"
    # The attention projections of the double-stream blocks (image and text streams) and the single-stream blocks'
    # q/k/v; add "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"... through target_modules.
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    text_encoder_targets = ()
    conv_targets = ()
    offload_encoders = True  # T5-XXL is 9.5 GB in bf16: off the card once every caption is cached

    def swap_blocks(self, transformer) -> list[torch.nn.Module]:
        """What blocks_to_swap counts, in the order they run: the 19 double-stream blocks, then the 38 single-stream
        ones (dev; kohya swaps the same blocks). The last ones are swapped first."""
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def check(self, cfg) -> list[str]:
        problems = []
        if cfg.train_text_encoder:
            problems.append(f"train_text_encoder is not supported for {self.label} (its text encoders stay frozen, "
                            "as in kohya and ai-toolkit); set train_text_encoder: false.")
        if cfg.min_snr_gamma:
            problems.append(f"min_snr_gamma weights DDPM noise levels; {self.label} trains with flow matching. "
                            "Remove min_snr_gamma.")
        if cfg.noise_offset:
            problems.append(f"noise_offset is a DDPM (SD1.5/SDXL) setting; {self.label} trains with flow matching. "
                            "Set noise_offset: 0.")
        return problems

    def noise_scheduler(self, pipe):
        return pipe.scheduler  # read only: its shift settings are the ones the pipeline samples with

    def bucket_step(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # latents are packed 2×2 into tokens

    def max_sequence_length(self, pipe) -> int:
        """T5 tokens per caption: 512 for dev, 256 for schnell (as BFL trained them), capped by the tokenizer."""
        return min(_text_tokens(pipe.transformer.config), pipe.tokenizer_2.model_max_length)

    def encode_text(self, pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                               max_sequence_length=self.max_sequence_length(pipe))
        return embeds, pooled

    def prompt_inputs(self, pipe, prompt: str, device) -> dict:
        """A sample prompt as the pipeline's embeddings, encoded in the encode phase (T5 need not be on the card)."""
        embeds, pooled = self.encode_text(pipe, [prompt], device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def size_conditioning(self, sizes, buckets) -> None:
        return None

    def sigmas(self, scheduler, rng: torch.Generator, batch: int, tokens: int) -> torch.Tensor:
        """Logit-normal draws, shifted toward noise for larger images by the scheduler's own shift (Flux's
        resolution-dependent mu for dev, the fixed shift for schnell)."""
        import math

        import torch
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        u = torch.sigmoid(torch.randn(batch, generator=rng))
        config = scheduler.config
        if config.use_dynamic_shifting:
            mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                                 config.max_shift)
        else:
            mu = math.log(config.shift)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))

    def loss(self, engine, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor | None,
             conditioning, rng: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F
        from diffusers import FluxPipeline

        from studio.hardware import to_device

        device, transformer = engine.device, engine.denoiser
        bsz, channels, height, width = latents.shape
        noise = to_device(torch.randn(latents.shape, generator=rng), device, latents.dtype)
        sigmas = to_device(self.sigmas(engine.noise_scheduler, rng, bsz, (height // 2) * (width // 2)), device)
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, latents.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=latents.dtype)
        pred = transformer(hidden_states=packed, timestep=sigmas.to(latents.dtype),
                           encoder_hidden_states=embeds.to(device), txt_ids=text_ids, img_ids=image_ids,
                           **self.conditions(transformer, pooled, packed), return_dict=False)[0]
        scale = engine.pipe.vae_scale_factor
        pred = FluxPipeline._unpack_latents(pred, height * scale, width * scale, scale)
        return F.mse_loss(pred.float(), (noise - latents).float())

    def conditions(self, transformer, pooled: torch.Tensor, packed: torch.Tensor) -> dict:
        """Flux.1's inputs beyond the packed latents and T5's tokens: CLIP's pooled embedding, dev's guidance."""
        import torch

        guidance = (torch.full((packed.shape[0],), TRAIN_GUIDANCE, device=packed.device, dtype=torch.float32)
                    if transformer.config.guidance_embeds else None)
        return {"guidance": guidance, "pooled_projections": pooled.to(packed.device)}

    def to_file(self, peft_state: dict[str, torch.Tensor], scaling: Scaling) -> dict[str, torch.Tensor]:
        """diffusers' `transformer.…lora_A/lora_B` keys — what FluxPipeline.load_lora_weights reads and ComfyUI's /
        Forge's Flux key maps resolve onto their fused layers — with alpha/rank folded into lora_B, so every loader
        applies the trained strength without an alpha key."""
        return {key: (value * scaling.factor() if ".lora_B." in key else value).detach().contiguous().cpu()
                for key, value in peft_state.items()}

    # --- for the memory planner (studio/plan/probes.py): the transformer's inputs on the meta device ---------------
    def text_shape(self, transformer) -> tuple[int, int]:
        return _text_tokens(transformer.config), transformer.config.joint_attention_dim

    def meta_inputs(self, transformer, latent_side: int, embeds: torch.Tensor, dtype: torch.dtype) -> dict:
        import torch

        def meta(*size: int) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device="meta")

        config, tokens = transformer.config, (latent_side // 2) ** 2
        return {"hidden_states": meta(1, tokens, config.in_channels), "timestep": meta(1),
                "guidance": meta(1) if config.guidance_embeds else None,
                "pooled_projections": meta(1, config.pooled_projection_dim), "encoder_hidden_states": embeds,
                "txt_ids": meta(embeds.shape[1], 3), "img_ids": meta(tokens, 3)}

    def modelspec_architecture(self, pipe) -> str:
        """kohya's sai_model_spec names dev and schnell apart (schnell has no guidance embedder)."""
        return "flux-1-dev" if pipe.transformer.config.guidance_embeds else "flux-1-schnell"

    def sampling(self, pipe) -> dict:
        """Sample / preview defaults: schnell is distilled to ~4 steps without guidance; dev ~28 at guidance 3.5."""
        dev = pipe.transformer.config.guidance_embeds
        return {"num_inference_steps": 28 if dev else 4, "guidance_scale": 3.5 if dev else 0.0,
                "max_sequence_length": self.max_sequence_length(pipe)}


def _text_tokens(transformer_config) -> int:
    return 512 if transformer_config.guidance_embeds else 256


def recognise(shapes: Shapes, name: str) -> bool:
    from studio.models.flux_single_file import flux_kind
    return flux_kind(shapes, name) is not None


register(Family(
    name="flux1", label="Flux.1", task=IMAGE_TASK, engine="studio.engines.diffusion:DiffusionEngine",
    recipe="studio.families.flux1:FluxRecipe", pipeline_classes=("FluxPipeline",), recognise=recognise,
    single_file_loader="studio.models.flux_single_file:load_flux_single_file", name_hints=("flux",),
    config_dir="flux1-dev", native_resolution=1024, trains_text_encoder=False, quantized_base=("fp8", "nf4"),
    webui_version="flux1", lora_loaders=("Forge", "ComfyUI", "diffusers"),
    network_module="networks.lora_flux",
    # dev's; a schnell base gets kohya's "flux-1-schnell" (FluxRecipe.modelspec_architecture), and Forge knows both
    # as Flux by the implementation
    modelspec_architecture="flux-1-dev", modelspec_implementation="https://github.com/black-forest-labs/flux",
    lora_markers=("transformer.", "lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_",
                  "diffusion_model.double_blocks.", "double_blocks."),
    # Flux captions are sentences for T5, not tag lists: unshuffled, every caption's embedding is cached and T5
    # (9.5 GB) leaves the card before the first step. lora_alpha None: alpha follows the rank (scale 1), as --help says,
    # also when the user sets only lora_rank.
    preset_values={"learning_rate": 1e-4, "lora_rank": 16, "lora_alpha": None, "shuffle_tags": False},
))
