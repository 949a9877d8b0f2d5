"""A tiny random-weight Flux.1-shaped pipeline (dev-like: guidance embedding on), built in seconds, no download.

The real diffusers / transformers classes at toy sizes: a 16-channel VAE with Flux's shift and scale, latents packed
2×2 into the transformer's 64 input channels, CLIP for the pooled embedding, a small T5 encoder for the sequence, and
the dynamic-shift flow-matching scheduler. A 64 px image is a 4×4 grid of packed latent tokens, as at full size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from studio.demo.diffusion import _text_config
from studio.demo.tokenizers import CLIP_MERGE_WORDS, build_clip_tokenizer

T5_WIDTH = 32
MAX_SEQUENCE_LENGTH = 16  # the tiny T5 tokenizer's model_max_length: what the pipeline pads prompts to


def build_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the demo captions' words (unknown words → <unk>), with T5's pad / eos / unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", *CLIP_MERGE_WORDS, "shape", "shapes", "demo", "sks", "dot", "stripes"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_SEQUENCE_LENGTH)


def tiny_flux_transformer(guidance: bool = True, layers: int = 1, single_layers: int = 1) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                  pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))


def tiny_flux_vae() -> AutoencoderKL:
    """Flux.1's 16-channel VAE layout (shift and scale as published) at toy width; Chroma's too."""
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=16, sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)


def tiny_t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=64, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler settings (dynamic, resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer(out_dir)
    vae, t5 = tiny_flux_vae(), tiny_t5()  # in this order: the demo model's random weights stay as they were
    pipe = FluxPipeline(scheduler=flux_scheduler(), vae=vae, text_encoder=CLIPTextModel(_text_config(clip_tokenizer)),
                        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=build_t5_tokenizer(),
                        transformer=tiny_flux_transformer())
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src")
    return out_dir
