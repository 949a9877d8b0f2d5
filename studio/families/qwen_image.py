"""Qwen-Image (Qwen/Qwen-Image and text-to-image fine-tunes that keep the layout): a 20 B MMDiT (60 double-stream
blocks) over 2×2-packed latents of its own 16-channel Wan-style VAE (one-frame video latents, normalised per channel
by the VAE config's latents_mean / latents_std), conditioned on Qwen2.5-VL-7B's last hidden states of the caption in
Qwen-Image's system prompt (the template's 34 tokens dropped), with the caption's padding masked.

Trained as QwenImagePipeline samples: x_t = (1 − σ)·x0 + σ·noise, the transformer is given σ and predicts
noise − x0; σ drawn logit-normal and shifted by the scheduler's resolution-dependent (exponential) shift, as
musubi-tuner's `qwen_shift` timestep sampling does.

Default LoRA targets, as musubi-tuner's networks.lora_qwen_image chooses them: the Linears of every
QwenImageTransformerBlock (image- and text-stream attention and MLPs) but not their modulation (img_mod / txt_mod).

Exported in diffusers' `transformer.…lora_A/lora_B` names: ComfyUI's QwenImage model uses diffusers' module names,
and comfy/lora.py maps `transformer.<name>` onto `diffusion_model.<name>` one to one; QwenImagePipeline loads the same
keys.

The second tensor the engine caches per caption is the text mask; captions are padded to MAX_SEQUENCE_LENGTH and each
batch is cut back to its longest caption before the transformer runs.
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

MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's default prompt length
MARKERS = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight")  # ComfyUI's detection
NEGATIVE_PROMPT = " "  # the model card's empty negative prompt for true CFG


class QwenImageRecipe(FluxRecipe):
    """Training specifics of Qwen-Image. Flux.1's checks, sigma shift and export carry over."""
    label = "Qwen-Image"
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")

    def swap_blocks(self, transformer) -> list[torch.nn.Module]:
        """The 60 transformer blocks (musubi-tuner swaps the same: 16 swapped fit 24 GB, 45 fit 12 GB at 1024 px)."""
        return list(transformer.transformer_blocks)

    def max_sequence_length(self, pipe) -> int:
        return MAX_SEQUENCE_LENGTH

    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's one-frame latents, normalised per channel as QwenImagePipeline un-normalises them."""
        import torch

        latents = vae.encode(pixels.unsqueeze(2)).latent_dist.mean[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1)
        return (latents - mean) / std

    def encode_text(self, pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """QwenImagePipeline's caption states, padded to MAX_SEQUENCE_LENGTH with their mask (cacheable)."""
        import torch.nn.functional as F

        embeds, mask = pipe.encode_prompt(prompt=list(captions), device=device,
                                          max_sequence_length=MAX_SEQUENCE_LENGTH)
        if mask is None:  # every caption as long as the longest: the pipeline drops an all-ones mask
            mask = embeds.new_ones(embeds.shape[:2])
        pad = MAX_SEQUENCE_LENGTH - embeds.shape[1]
        return F.pad(embeds, (0, 0, 0, pad)), F.pad(mask.to(embeds.dtype), (0, pad))

    def prompt_inputs(self, pipe, prompt: str, device) -> dict:
        """A sample prompt and the model card's negative prompt for true CFG, as the pipeline's embeddings."""
        inputs = {}
        for key, text in (("prompt_embeds", prompt), ("negative_prompt_embeds", NEGATIVE_PROMPT)):
            embeds, mask = pipe.encode_prompt(prompt=text, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
            inputs[key] = embeds  # the mask given even when all ones (None), or the pipeline warns
            inputs[key.replace("embeds", "embeds_mask")] = embeds.new_ones(embeds.shape[:2]) if mask is None else mask
        return inputs

    def conditions(self, transformer, mask: torch.Tensor, packed: torch.Tensor) -> dict:
        return {"encoder_hidden_states_mask": mask.to(packed.device)}

    def loss(self, engine, latents: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor | None,
             conditioning, rng: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F
        from diffusers import QwenImagePipeline

        from studio.hardware import to_device

        device = engine.device
        bsz, channels, height, width = latents.shape
        noise = to_device(torch.randn(latents.shape, generator=rng), device, latents.dtype)
        sigmas = to_device(self.sigmas(engine.noise_scheduler, rng, bsz, (height // 2) * (width // 2)), device)
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        packed = QwenImagePipeline._pack_latents((1 - s) * latents + s * noise, bsz, channels, height, width)
        length = int(mask.sum(dim=1).max())  # the batch's longest caption: no attention over common padding
        pred = engine.denoiser(hidden_states=packed, timestep=sigmas.to(latents.dtype),
                               encoder_hidden_states=embeds[:, :length].to(device),
                               encoder_hidden_states_mask=mask[:, :length].to(device),
                               img_shapes=[[(1, height // 2, width // 2)]] * bsz, return_dict=False)[0]
        scale = engine.pipe.vae_scale_factor
        pred = QwenImagePipeline._unpack_latents(pred, height * scale, width * scale, scale)[:, :, 0]
        return F.mse_loss(pred.float(), (noise - latents).float())

    def text_shape(self, transformer) -> tuple[int, int]:
        return MAX_SEQUENCE_LENGTH, transformer.config.joint_attention_dim

    def meta_inputs(self, transformer, latent_side: int, embeds: torch.Tensor, dtype: torch.dtype) -> dict:
        import torch

        tokens = (latent_side // 2) ** 2
        return {"hidden_states": torch.empty(1, tokens, transformer.config.in_channels, dtype=dtype, device="meta"),
                "timestep": torch.empty(1, dtype=dtype, device="meta"), "encoder_hidden_states": embeds,
                "encoder_hidden_states_mask": torch.empty(1, embeds.shape[1], dtype=dtype, device="meta"),
                "img_shapes": [[(1, latent_side // 2, latent_side // 2)]]}

    def modelspec_architecture(self, pipe) -> str:
        return "Qwen-Image"  # musubi-tuner's ModelSpec name

    def sampling(self, pipe) -> dict:
        """The model card's: 50 steps, true CFG 4.0 with the negative prompt."""
        return {"num_inference_steps": 50, "true_cfg_scale": 4.0, "max_sequence_length": MAX_SEQUENCE_LENGTH}


def recognise(shapes: Shapes, name: str) -> bool:
    from pathlib import Path

    from studio.errors import StudioError
    from studio.models.transformer_single_file import transformer_shapes

    t = transformer_shapes(shapes)
    if not all(k in t for k in MARKERS):
        return False
    if "edit" in Path(name).name.lower():
        raise StudioError(f"base_model: {name} is Qwen-Image-Edit (by its file name; its weights have Qwen-Image's "
                          "shapes): an image-editing model conditioned on a reference image, which LoRA Studio cannot "
                          "train. Use Qwen-Image or a text-to-image fine-tune; if the file is one, rename it so its "
                          "name does not say 'edit'.")
    return True


def config_overrides(t: Shapes) -> dict:
    inner, in_channels = t["img_in.weight"]
    head = t["transformer_blocks.0.attn.norm_q.weight"][0]
    return {"num_layers": len({k.split(".")[1] for k in t if k.startswith("transformer_blocks.")}),
            "attention_head_dim": head, "num_attention_heads": inner // head, "in_channels": in_channels,
            "out_channels": t["proj_out.weight"][0] // 4, "joint_attention_dim": t["txt_in.weight"][1]}


# ComfyUI's qwen_image_bf16.safetensors: the transformer in diffusers' own names (bare or under
# model.diffusion_model.), the text encoder, VAE and tokenizer from base_components.
load_single_file = TransformerFile(label="Qwen-Image", pipeline="QwenImagePipeline",
                                   transformer="QwenImageTransformer2DModel",
                                   config_dir=CONFIG_ROOT / "qwen-image", default_components="Qwen/Qwen-Image",
                                   to_diffusers=dict, overrides=config_overrides)


register(Family(
    name="qwen_image", label="Qwen-Image", task=IMAGE_TASK, engine="studio.engines.diffusion:DiffusionEngine",
    recipe="studio.families.qwen_image:QwenImageRecipe", pipeline_classes=("QwenImagePipeline",),
    recognise=recognise, single_file_loader="studio.families.qwen_image:load_single_file",
    # 1024: what musubi-tuner's and ai-toolkit's Qwen-Image LoRAs train at (the model also renders 1328 px)
    name_hints=("qwen-image", "qwen_image", "qwenimage"), config_dir="qwen-image", native_resolution=1024,
    trains_text_encoder=False, quantized_base=("fp8", "nf4"),
    # musubi-tuner's ModelSpec (ARCH_QWEN_IMAGE / IMPL_QWEN_IMAGE) and network module; no WebUI filters Qwen-Image
    # LoRAs by ss_base_model_version, "qwen_image" names it plainly
    webui_version="qwen_image", network_module="networks.lora_qwen_image", modelspec_architecture="Qwen-Image",
    modelspec_implementation="https://github.com/QwenLM/Qwen-Image", lora_loaders=("ComfyUI", "diffusers"),
    lora_markers=("transformer.transformer_blocks.", "diffusion_model.transformer_blocks.", "transformer_blocks."),
    preset_values={"learning_rate": 1e-4, "lora_rank": 16, "lora_alpha": None, "shuffle_tags": False},
))
