"""Z-Image (Tongyi-MAI's Z-Image-Turbo and Z-Image base, and fine-tunes that keep the layout): a 6 B
single-stream flow-matching transformer (S3-DiT) over 2×2 patches of Flux's 16-channel VAE latents, conditioned on
Qwen3-4B's second-to-last hidden states of the chat-formatted caption (one sequence per caption, padding dropped).

Trained with the flow-matching objective ZImagePipeline samples with: x_t = (1 − σ)·x0 + σ·noise, the transformer is
given t = 1 − σ and predicts x0 − noise (the pipeline negates it into the scheduler's velocity); σ drawn logit-normal
and moved by the scheduler's own shift (3.0 for Turbo). Turbo is distilled to 8 steps: a LoRA trained on it directly
drifts from the distillation over long runs (ai-toolkit pairs it with a de-distill adapter); short runs and the
base model are fine.

Default LoRA targets: musubi-tuner's lora_zimage and ai-toolkit adapt the ZImageTransformerBlock modules (main layers
and both refiners); of their Linears we take attention (to_q/k/v, to_out.0) and the SwiGLU feed-forward (w1/w2/w3),
not the adaLN modulation.

Exported in diffusers' `transformer.…lora_A/lora_B` names: ZImagePipeline.load_lora_weights reads them, and ComfyUI's
Lumina2 key map (comfy/lora.py with comfy/utils.py z_image_to_diffusers) maps `transformer.layers.N.attention.to_q`
etc. onto its fused qkv slices, `to_out.0` onto `out`, for layers, context_refiner and noise_refiner.

The second tensor the engine caches per caption is the token mask of the padded Qwen3 states.
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

MAX_SEQUENCE_LENGTH = 512  # Qwen3 tokens per caption, ZImagePipeline's default
MARKER = "layers.0.adaLN_modulation.0.weight"  # Lumina 2 has adaLN_modulation.1 (SiLU first): diffusers' test too
STEPS_TURBO, STEPS_BASE = 9, 28  # the model cards: Turbo 9 steps (8 evaluations) without guidance; base 28-50, CFG 4


class ZImageRecipe(FluxRecipe):
    """Training specifics of Z-Image. Flux.1's checks, scheduler shift and export carry over; the rest is its own."""
    label = "Z-Image"
    targets = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")

    def swap_blocks(self, transformer) -> list[torch.nn.Module]:
        """What blocks_to_swap counts: the 30 main layers (musubi-tuner swaps the same); the refiners run first and
        are 2 × 2 small blocks."""
        return list(transformer.layers)

    def bucket_step(self, pipe) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.all_patch_size[0]

    def max_sequence_length(self, pipe) -> int:
        return min(MAX_SEQUENCE_LENGTH, pipe.tokenizer.model_max_length)

    def encode_text(self, pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """ZImagePipeline's per-caption states, padded to one length with a mask so the engine can cache them."""
        import torch

        states = pipe.encode_prompt(prompt=list(captions), device=device, do_classifier_free_guidance=False,
                                    max_sequence_length=self.max_sequence_length(pipe))[0]
        length = self.max_sequence_length(pipe)
        embeds = torch.zeros(len(states), length, states[0].shape[-1], dtype=states[0].dtype, device=device)
        mask = torch.zeros(len(states), length, dtype=states[0].dtype, device=device)
        for i, state in enumerate(states):
            embeds[i, :len(state)], mask[i, :len(state)] = state, 1
        return embeds, mask

    def prompt_inputs(self, pipe, prompt: str, device) -> dict:
        guided = self.sampling(pipe)["guidance_scale"] > 0
        embeds, negative = pipe.encode_prompt(prompt=prompt, negative_prompt="" if guided else None, device=device,
                                              do_classifier_free_guidance=guided,
                                              max_sequence_length=self.max_sequence_length(pipe))
        return {"prompt_embeds": embeds, **({"negative_prompt_embeds": negative} if guided else {})}

    def loss(self, engine, latents: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor | None,
             conditioning, rng: torch.Generator) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        from studio.hardware import to_device

        device = engine.device
        bsz, _, height, width = latents.shape
        noise = to_device(torch.randn(latents.shape, generator=rng), device, latents.dtype)
        patch = engine.denoiser.config.all_patch_size[0]
        sigmas = to_device(self.sigmas(engine.noise_scheduler, rng, bsz, (height // patch) * (width // patch)), device)
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        captions = [embeds[i][mask[i].bool()].to(device) for i in range(bsz)]
        out = engine.denoiser(list(noisy.unsqueeze(2).unbind(0)), (1 - sigmas).to(latents.dtype), captions,
                              return_dict=False)[0]
        pred = torch.stack(out).squeeze(2)
        return F.mse_loss(pred.float(), (latents - noise).float())

    def text_shape(self, transformer) -> tuple[int, int]:
        return MAX_SEQUENCE_LENGTH, transformer.config.cap_feat_dim

    def meta_inputs(self, transformer, latent_side: int, embeds: torch.Tensor, dtype: torch.dtype) -> dict:
        import torch

        latents = torch.empty(transformer.config.in_channels, 1, latent_side, latent_side, dtype=dtype, device="meta")
        return {"x": [latents], "t": torch.empty(1, dtype=dtype, device="meta"), "cap_feats": [embeds[0]]}

    def modelspec_architecture(self, pipe) -> str:
        return "Z-Image"  # musubi-tuner's ModelSpec name, Turbo and base alike

    def sampling(self, pipe) -> dict:
        """Turbo: 9 steps without guidance; the base model: 28 steps at CFG 4 (its model card's range)."""
        turbo = _is_turbo(pipe)
        return {"num_inference_steps": STEPS_TURBO if turbo else STEPS_BASE, "guidance_scale": 0.0 if turbo else 4.0,
                "max_sequence_length": self.max_sequence_length(pipe)}


def _is_turbo(pipe) -> bool:
    """Turbo and base share every shape; the model's name tells them apart (a fine-tune keeps "turbo" in it, as the
    ones people publish do), and an unnamed model is taken for Turbo, the one most people have."""
    name = str(pipe.config.get("_name_or_path", "")).lower()
    return "turbo" in name or "z-image" not in name.replace("_", "-")


def recognise(shapes: Shapes, name: str) -> bool:
    from studio.errors import StudioError
    from studio.models.transformer_single_file import transformer_shapes

    t = transformer_shapes(shapes)
    if MARKER not in t or not any(k.startswith("cap_embedder.") for k in t):
        return False
    if any(k.startswith(("siglip_embedder.", "control_layers.", "control_all_x_embedder.")) for k in t):
        raise StudioError(f"base_model: {name} is a Z-Image Omni / ControlNet model (image-conditioned), which LoRA "
                          "Studio cannot train. Use Z-Image-Turbo, Z-Image or a text-to-image fine-tune of them.")
    return True


# --- single-file checkpoints (ComfyUI models/diffusion_models/z_image_turbo_bf16.safetensors) ----------------------

def to_diffusers(sd: dict) -> dict:
    """A Z-Image file's transformer tensors → diffusers' names: ComfyUI's layout (fused attention.qkv, attention.out,
    x_embedder, final_layer) through diffusers' own converter, which splits qkv in three at any width; a file already
    in diffusers' names as it is."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return sd if "all_x_embedder.2-1.weight" in sd else convert_z_image_transformer_checkpoint_to_diffusers(sd)


def config_overrides(t: Shapes) -> dict:
    """Config values read from a file's shapes, in either layout (a pruned fine-tune, the tiny test model)."""
    embedder = t.get("x_embedder.weight") or t["all_x_embedder.2-1.weight"]
    head = (t.get("layers.0.attention.q_norm.weight") or t["layers.0.attention.norm_q.weight"])[0]
    dim = embedder[0]
    if "layers.0.attention.qkv.weight" in t:
        kv_heads = (t["layers.0.attention.qkv.weight"][0] // head - dim // head) // 2
    else:
        kv_heads = t["layers.0.attention.to_k.weight"][0] // head
    return {"dim": dim, "in_channels": embedder[1] // 4, "n_heads": dim // head, "n_kv_heads": kv_heads,
            "n_layers": _count(t, "layers."), "n_refiner_layers": _count(t, "noise_refiner."),
            "cap_feat_dim": t["cap_embedder.1.weight"][1]}


def _count(t: Shapes, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in t if k.startswith(prefix)})


load_single_file = TransformerFile(label="Z-Image", pipeline="ZImagePipeline", transformer="ZImageTransformer2DModel",
                                   config_dir=CONFIG_ROOT / "z-image-turbo",
                                   default_components="Tongyi-MAI/Z-Image-Turbo",
                                   to_diffusers=to_diffusers, overrides=config_overrides)


register(Family(
    name="z_image", label="Z-Image", task=IMAGE_TASK, engine="studio.engines.diffusion:DiffusionEngine",
    recipe="studio.families.z_image:ZImageRecipe", pipeline_classes=("ZImagePipeline",), recognise=recognise,
    single_file_loader="studio.families.z_image:load_single_file", name_hints=("z-image", "z_image", "zimage"),
    config_dir="z-image-turbo", native_resolution=1024, trains_text_encoder=False, quantized_base=("fp8", "nf4"),
    # what musubi-tuner writes for a Z-Image LoRA: ModelSpec ARCH_Z_IMAGE / IMPL_Z_IMAGE, its networks.lora_zimage,
    # ss_base_model_version "z_image"
    webui_version="z_image", network_module="networks.lora_zimage", modelspec_architecture="Z-Image",
    modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image", lora_loaders=("ComfyUI", "diffusers"),
    lora_markers=("transformer.layers.", "transformer.noise_refiner.", "diffusion_model.layers.", "lora_unet_layers_"),
    preset_values={"learning_rate": 1e-4, "lora_rank": 16, "lora_alpha": None, "shuffle_tags": False},
))
