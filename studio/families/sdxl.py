"""SDXL (and fine-tunes that keep its layout: Pony, Illustrious, NoobAI...): the SD1.5 recipe plus a second text
encoder (OpenCLIP-bigG, whose pooled output conditions the UNet) and size conditioning (original size, crop, target)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from studio.families import Family, Shapes, register
from studio.families.sd15 import LYCORIS_TYPES, UNET_LORA_MARKERS, UNetRecipe
from studio.tasks import IMAGE_TASK

if TYPE_CHECKING:
    import torch


class SDXLRecipe(UNetRecipe):
    kohya_renames = {}  # lora_te1_ / lora_te2_, as written

    def encode_text(self, pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        return out[0], out[2]  # penultimate hidden states of both encoders, pooled output of the second

    def prompt_inputs(self, pipe, prompt: str, device) -> dict:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def size_conditioning(self, sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> torch.Tensor:
        """(original h, w, crop top, left, target h, w) per sample: the image as if resized to cover its bucket."""
        import torch

        rows = []
        for (width, height), (bucket_w, bucket_h) in zip(sizes, buckets):
            scale = max(bucket_w / width, bucket_h / height)
            orig_w, orig_h = round(width * scale), round(height * scale)
            rows.append([orig_h, orig_w, (orig_h - bucket_h) // 2, (orig_w - bucket_w) // 2, bucket_h, bucket_w])
        return torch.tensor(rows, dtype=torch.float32)

    def added_conditions(self, pooled, conditioning, embeds) -> dict:
        from studio.hardware import to_device
        return {"added_cond_kwargs": {"text_embeds": pooled.to(embeds.device),
                                      "time_ids": to_device(conditioning, embeds.device, embeds.dtype)}}

    def meta_conditions(self, config, dtype) -> dict:
        import torch

        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {"added_cond_kwargs": {"text_embeds": torch.empty(1, pooled, dtype=dtype, device="meta"),
                                      "time_ids": torch.empty(1, 6, dtype=dtype, device="meta")}}


def recognise(shapes: Shapes, name: str) -> bool:
    from studio.models.single_file import stable_diffusion_kind
    return stable_diffusion_kind(shapes, name) == "sdxl"


register(Family(
    name="sdxl", label="SDXL", task=IMAGE_TASK, engine="studio.engines.diffusion:DiffusionEngine",
    recipe="studio.families.sdxl:SDXLRecipe", pipeline_classes=("StableDiffusionXLPipeline",), recognise=recognise,
    single_file_loader="studio.models.single_file:load_single_file", name_hints=("xl", "pony", "illustrious"),
    config_dir="sdxl", native_resolution=1024, webui_version="sdxl_base_v1-0", lora_markers=UNET_LORA_MARKERS,
    network_types=LYCORIS_TYPES,
    modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
))
