"""Stable Diffusion 1.x (and fine-tunes that keep its layout): a UNet denoiser trained on DDPM noise (epsilon or
v-prediction), one CLIP-L text encoder, a 4-channel VAE. The recipe here is also SDXL's base (studio/families/sdxl.py).

The module imports no torch at the top: the registry is read by the UI at start-up; the recipe imports what it uses.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import TYPE_CHECKING

from studio.families import Family, Shapes, register
from studio.tasks import IMAGE_TASK

if TYPE_CHECKING:
    import torch

    from studio.adapters import Scaling

LYCORIS_TYPES = ("lora", "locon", "loha", "lokr", "dora")  # what the kohya / LyCORIS export layout carries
# Denoiser keys of a LoRA file made for a Stable Diffusion UNet (kohya names in diffusers or LDM layout, diffusers).
UNET_LORA_MARKERS = ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
                     "lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_", "unet.")


class UNetRecipe:
    """Training specifics of the Stable Diffusion UNet families, for studio.engines.diffusion.DiffusionEngine."""
    denoiser = "unet"  # the pipeline attribute that carries the LoRA
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    kohya_renames = {"lora_te1_": "lora_te_"}  # one text encoder: A1111's name for it is lora_te_
    conv_targets = ("conv1", "conv2", "conv_shortcut", "conv")  # resnets, down/upsamplers: LoCon's extra layers
    offload_encoders = False  # CLIP is small: it stays on the device

    def check(self, cfg) -> list[str]:
        return []

    def swap_blocks(self, unet) -> list[torch.nn.Module]:
        """What blocks_to_swap counts, in the order they run: each stage's resnets and the transformer blocks inside
        its attentions (SDXL: 87 units, 98 % of the UNet's weights, none over 2 % of it; SD1.5: 38 units, 91 %).
        Swapping whole down / mid / up stages would give SDXL only 7 very uneven steps (up_blocks.0 alone is
        47 %), and two stages in flight would hold most of the UNet. The last ones (up blocks) are swapped first."""
        units = []
        stages = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
        for stage in stages:
            resnets = list(stage.resnets)
            attentions = [list(a.transformer_blocks) for a in getattr(stage, "attentions", None) or []]
            if stage is unet.mid_block:  # a resnet, then (attention, resnet) pairs
                units.append(resnets.pop(0))
                pairs = zip_longest(attentions, [[r] for r in resnets], fillvalue=[])
            else:  # (resnet, attention) pairs
                pairs = zip_longest([[r] for r in resnets], attentions, fillvalue=[])
            for first, second in pairs:
                units += [*first, *second]
        return units

    def noise_scheduler(self, pipe):
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(pipe.scheduler.config)

    def bucket_step(self, pipe) -> int:
        """Bucket sides survive the VAE (x8) and the UNet's downsampling (x2 per level after the first)."""
        return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

    def encode_text(self, pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' own prompt encoding (the embeddings the pipeline renders with)."""
        out = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        return out[0], None

    def prompt_inputs(self, pipe, prompt: str, device) -> dict:
        """A sample prompt as the pipeline's embeddings (with the empty negative prompt's for guidance), encoded in
        the encode phase: sampling then needs no text encoder on the card."""
        embeds, negative = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=True)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def size_conditioning(self, sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> torch.Tensor | None:
        return None

    def loss(self, engine, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor | None,
             conditioning: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F
        from diffusers.training_utils import compute_snr

        from studio.errors import StudioError
        from studio.hardware import to_device

        cfg, device, scheduler = engine.cfg, engine.device, engine.noise_scheduler
        bsz = latents.shape[0]
        noise = to_device(torch.randn(latents.shape, generator=rng), device, latents.dtype)
        if cfg.noise_offset:
            # Shifts each channel's mean so the model learns to change overall brightness.
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=rng)
            noise = noise + cfg.noise_offset * offset.to(device, latents.dtype)
        timesteps = to_device(torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=rng), device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = engine.denoiser(noisy, timesteps, embeds, **self.added_conditions(pooled, conditioning, embeds)).sample

        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise StudioError(f"The scheduler's prediction_type '{prediction_type}' is not supported for training "
                              "(epsilon or v_prediction).")
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            # Min-SNR weighting (Hang et al. 2023): stop easy, low-noise steps from dominating the loss.
            snr = compute_snr(scheduler, timesteps)
            weight = snr.clamp(max=cfg.min_snr_gamma)
            per_sample = per_sample * (weight / (snr + 1 if prediction_type == "v_prediction" else snr))
        return per_sample.mean()

    def added_conditions(self, pooled, conditioning, embeds) -> dict:
        return {}

    # --- for the memory planner (studio/plan/probes.py): the denoiser's inputs on the meta device -----------------
    def text_shape(self, denoiser) -> tuple[int, int]:
        return 77, denoiser.config.cross_attention_dim  # CLIP's context: every caption is padded to 77 tokens

    def meta_inputs(self, denoiser, latent_side: int, embeds: torch.Tensor, dtype: torch.dtype) -> dict:
        import torch

        config = denoiser.config
        return {"sample": torch.empty(1, config.in_channels, latent_side, latent_side, dtype=dtype, device="meta"),
                "timestep": torch.zeros(1, dtype=torch.long, device="meta"), "encoder_hidden_states": embeds,
                **self.meta_conditions(config, dtype)}

    def meta_conditions(self, config, dtype) -> dict:
        return {}

    def sampling(self, pipe) -> dict:
        return {"num_inference_steps": 20, "guidance_scale": 7.0}

    def to_file(self, peft_state: dict[str, torch.Tensor], scaling: Scaling) -> dict[str, torch.Tensor]:
        """The exported layout: kohya / LyCORIS keys with the true alpha (studio/export/kohya.py)."""
        from studio.export.kohya import to_kohya
        return to_kohya(peft_state, scaling, self.kohya_renames)


def recognise(shapes: Shapes, name: str) -> bool:
    from studio.models.single_file import stable_diffusion_kind
    return stable_diffusion_kind(shapes, name) == "sd15"


register(Family(
    name="sd15", label="SD1.5", task=IMAGE_TASK, engine="studio.engines.diffusion:DiffusionEngine",
    recipe="studio.families.sd15:UNetRecipe", pipeline_classes=("StableDiffusionPipeline",), recognise=recognise,
    single_file_loader="studio.models.single_file:load_single_file", config_dir="sd15", native_resolution=512,
    webui_version="sd_v1", lora_markers=UNET_LORA_MARKERS, network_types=LYCORIS_TYPES,
    modelspec_architecture="stable-diffusion-v1", modelspec_implementation="diffusers",  # kohya's for SD1 LoRAs
))
