"""A tiny random-weight Z-Image pipeline, built in seconds, no download: the real ZImageTransformer2DModel (one main
layer and one layer per refiner; every name as at full size), Flux's 16-channel VAE layout, and a 2-layer Qwen3
encoder with a word-level tokenizer that has Qwen's chat template (ZImagePipeline formats every prompt with it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from studio.demo.flux import tiny_flux_vae
from studio.demo.tokenizers import CLIP_MERGE_WORDS

CAPTION_WIDTH = 24
MAX_LENGTH = 32  # the tokenizer's model_max_length: what prompts are padded to
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "<think>", "</think>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [*SPECIAL, *CLIP_MERGE_WORDS, "shape", "shapes", "demo", "sks", "dot", "stripes", "picture", "flat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", model_max_length=MAX_LENGTH, chat_template=CHAT_TEMPLATE)


def tiny_z_image_transformer() -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                    cap_feat_dim=CAPTION_WIDTH, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])


def build_tiny_z_image(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    qwen3 = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=CAPTION_WIDTH, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                                   max_position_embeddings=MAX_LENGTH * 4))
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_flux_vae(),
                          text_encoder=qwen3, tokenizer=tokenizer, transformer=tiny_z_image_transformer())
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src", ignore_errors=True)
    return out_dir


def z_image_file_layout(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers ZImageTransformer2DModel state dict in the layout of the Z-Image files ComfyUI users have (fused
    attention.qkv, attention.out, q_norm / k_norm, x_embedder, final_layer), under `prefix`. The inverse of diffusers'
    convert_z_image_transformer_checkpoint_to_diffusers; any width."""
    renames = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
               ".attention.norm_k.": ".attention.k_norm."}
    out = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [sd[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            out[prefix + key.replace(".to_q.", ".qkv.")] = torch.cat(parts, dim=0)
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[prefix + key] = value
    return out


def write_z_image_checkpoint(pipeline_dir: str | Path, out_file: str | Path, prefix: str = "") -> Path:
    """The transformer of a diffusers Z-Image folder as one `.safetensors` in ComfyUI's layout."""
    from safetensors.torch import save_file

    from studio.demo.single_file import _weights

    tensors = z_image_file_layout(_weights(Path(pipeline_dir) / "transformer"), prefix)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file), metadata={"format": "pt"})
    return Path(out_file)
