"""A tiny random-weight Qwen-Image pipeline, built in seconds, no download: the real QwenImageTransformer2DModel (two
blocks; every name as at full size), the real Wan-style AutoencoderKLQwenImage at toy width, and a 2-layer
Qwen2.5-VL encoder with a character-level tokenizer (Qwen-Image's prompt template is dropped by token count, 34
tokens, so the tokenizer must give the template at least that many: one per character does).
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

TEXT_WIDTH = 24
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [*SPECIAL, *string.printable]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(dict.fromkeys(chars))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        unk_token="<unk>", model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwen_vl(vocab: int) -> Qwen2_5_VLForConditionalGeneration:
    text = dict(vocab_size=vocab, hidden_size=TEXT_WIDTH, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}, bos_token_id=0, eos_token_id=2)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_WIDTH,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                               bos_token_id=0, eos_token_id=2, pad_token_id=0))


def tiny_qwen_image_transformer() -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
                                       axes_dims_rope=(4, 6, 6))


def build_tiny_qwen_image(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        Path(__file__).parent.parent / "models" / "configs" / "qwen-image", subfolder="scheduler")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_qwen_vl(len(tokenizer)),
                             tokenizer=tokenizer, transformer=tiny_qwen_image_transformer())
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src", ignore_errors=True)
    return out_dir


def write_qwen_image_checkpoint(pipeline_dir: str | Path, out_file: str | Path, prefix: str = "") -> Path:
    """The transformer of a diffusers Qwen-Image folder as one `.safetensors` as ComfyUI keeps it
    (qwen_image_bf16.safetensors: diffusers' names, bare; `model.diffusion_model.` in a saved checkpoint)."""
    from safetensors.torch import save_file

    from studio.demo.single_file import _weights

    tensors = {prefix + k: v.contiguous() for k, v in _weights(Path(pipeline_dir) / "transformer").items()}
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata={"format": "pt"})
    return Path(out_file)
