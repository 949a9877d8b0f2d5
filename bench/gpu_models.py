"""What the GPU bench trains on, built here without a download and kept under --work for the next run:
full-size models with random weights from the shipped configs, generated images, and long chats."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from gpu_device import Cuda

IMAGES_PER_DATASET, CHATS, REPLY_WORDS = 16, 16, 1500


def _done(folder: Path) -> bool:
    """Whether a build finished: the marker is written last, so a build cut short is redone."""
    return (folder / ".bench-complete").is_file()


def _mark_done(folder: Path) -> None:
    (folder / ".bench-complete").write_text("ok")


def build_image_model(config_dir: Path, out: Path, gpu: Cuda) -> Path:
    """A diffusers folder of random-init fp16 weights for the configs in `config_dir` (reused when complete)."""
    import importlib

    import torch
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(config_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", ".demo-version"))
    index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        library, cls_name = (index.get(name) or [None, None])[:2]
        if not cls_name:
            continue
        config = json.loads((out / name / "config.json").read_text(encoding="utf-8"))
        cls = getattr(importlib.import_module(library), cls_name)
        torch.manual_seed(0)
        with torch.device(gpu.device):
            module = cls.from_config(config) if library == "diffusers" else cls(cls.config_class.from_dict(config))
        module.to(gpu.device, torch.float16).save_pretrained(out / name)
        del module
        gpu.free()
    _mark_done(out)
    return out


def make_image_data(out: Path, resolution: int) -> Path:
    """IMAGES_PER_DATASET distinct square PNGs at `resolution` with a metadata.csv."""
    from PIL import ImageDraw

    from studio.data.captions import write_csv_captions
    from studio.demo.datasets import COLOURS, SHAPES, draw_shape
    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(IMAGES_PER_DATASET):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        image = draw_shape(shape, colour, (resolution, resolution))
        stripe = resolution * (i + 1) // (IMAGES_PER_DATASET + 1)
        ImageDraw.Draw(image).rectangle((0, 0, stripe, resolution // 16), fill=(30 + 13 * i, 90, 160))
        name = f"{i:02d}-{colour}-{shape}.png"
        image.save(out / name)
        captions[name] = f"a {colour} {shape}, flat colour, white background, stripe {i}"
    write_csv_captions(out / "metadata.csv", captions)
    _mark_done(out)
    return out


def chat_conversations() -> list[list[dict]]:
    """CHATS conversations whose replies run past any max_length the planner picks (so every row is full)."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ra", "tu", "shi", "po", "ve", "di", "an", "el", "or", "um", "ba", "ze"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    return [[{"role": "system", "content": "You are a storyteller."},
             {"role": "user", "content": f"Tell story number {i}."},
             {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(REPLY_WORDS)) + "."}]
            for i in range(CHATS)]


def make_chat_data(out: Path, chats: list[list[dict]]) -> Path:
    """A chat dataset folder: the conversations as chats.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    return out


def build_llm_model(config_dir: Path, out: Path, chats: list[list[dict]], gpu: Cuda) -> Path:
    """A transformers folder: random-init bf16 weights for `config_dir`'s config.json and a tokenizer trained on
    the chats (its ids are all inside the model's vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from studio.demo.tokenizers import build_llama_tokenizer
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = build_llama_tokenizer([m["content"] for chat in chats for m in chat])
    config = AutoConfig.from_pretrained(str(config_dir))
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    torch.manual_seed(0)
    with torch.device(gpu.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to(gpu.device).save_pretrained(out, max_shard_size="5GB")
    del model
    gpu.free()
    tokenizer.save_pretrained(out)
    _mark_done(out)
    return out

