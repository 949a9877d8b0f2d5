"""The tiny models reload offline with from_pretrained and run a forward pass."""

import csv
import json

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.demo import ensure_demo


def test_sd15_reloads_and_generates(demo):
    pipe = StableDiffusionPipeline.from_pretrained(demo.sd15)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # the real 8x downscale


def test_sdxl_reloads_and_generates(demo):
    pipe = StableDiffusionXLPipeline.from_pretrained(demo.sdxl)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_llama_reloads_with_chat_template(demo):
    tok = AutoTokenizer.from_pretrained(demo.llama)
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    ids = tok.apply_chat_template([{"role": "user", "content": "What do bees make?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert tok.decode(tok("What do bees make?").input_ids, skip_special_tokens=True) == "What do bees make?"


def test_demo_datasets(demo):
    rows = list(csv.DictReader(open(demo.images / "metadata.csv", encoding="utf-8")))
    assert len(rows) == 8 and all((demo.images / r["filename"]).is_file() and r["prompt"] for r in rows)
    lines = (demo.chat / "chat.jsonl").read_text().splitlines()
    assert all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in lines)


def test_demo_is_built_once(demo):
    before = (demo.sd15 / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    ensure_demo(demo.root.parent)
    assert (demo.sd15 / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_building_the_demo_draws_no_progress_bars(tmp_path, capfd):
    """A build of seconds is no console of "Writing model shards" bars; the library's bars are back on after."""
    from transformers.utils import logging as hf_logging

    paths = ensure_demo(tmp_path)
    assert (paths.llama / "config.json").is_file()
    assert "Writing model shards" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
