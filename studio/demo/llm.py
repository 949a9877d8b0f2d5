"""A tiny random-weight Llama with a locally trained tokenizer and a chat template, no download."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from studio.demo.datasets import DEMO_QA
from studio.demo.tokenizers import build_llama_tokenizer

CORPUS = [f"{q} {a}" for q, a in DEMO_QA] + [
    "You are a helpful assistant.", "Hello! How can I help you today?", "The quick brown fox jumps over the lazy dog.",
    "Training a LoRA adapter changes a few low-rank matrices and leaves the base model untouched.",
]


def build_tiny_llama(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_llama_tokenizer(CORPUS * 4)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
