"""Tiny Stable Diffusion pipelines (SD1.5- and SDXL-shaped), no download.

Real diffusers classes at toy sizes: a 64 px image is an 8×8 latent, exactly as in the full-size models. The SDXL one
is random; the demo's SD1.5 is `build_tiny_sd15`'s architecture pretrained on coloured shapes by
tools/pretrain_demo.py (weights committed in PRETRAINED_SD15), so its previews are shapes, not noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.demo.tokenizers import build_clip_tokenizer

TEXT_HIDDEN = 32
PRETRAINED_SD15 = Path(__file__).resolve().parent / "weights" / "tiny-sd15"


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _text_config(tokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )


def copy_pretrained_sd15(out_dir: str | Path) -> Path:
    """The demo's SD1.5: the committed pretrained pipeline folder, copied (it draws coloured shapes at 64 px)."""
    shutil.copytree(PRETRAINED_SD15, out_dir, dirs_exist_ok=True)
    return Path(out_dir)


def build_tiny_sd15(out_dir: str | Path, seed: int = 0) -> Path:
    """Random weights in the demo architecture: tools/pretrain_demo.py starts from this."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out_dir)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=(2, 4), norm_num_groups=32,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)),
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src")
    return out_dir


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out_dir)
    time_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * time_dim, use_linear_projection=True,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src")
    return out_dir
