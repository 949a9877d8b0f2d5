"""Latents and text embeddings on disk (cache_latents_to_disk): reused by the next run, same training, bad files
recomputed."""

import csv
import shutil

import pytest
import torch
from diffusers.models.autoencoders.vae import Encoder
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextModel

from studio.config import config_from_dict
from studio.data.feature_cache import CACHE_DIR, DiskCache, model_fingerprint
from studio.events import EventSink
from studio.loop import train


@pytest.fixture
def encoder_calls():
    """Forward calls of the frozen encoders, counted by a real (global) forward hook."""
    calls = {"vae": 0, "text": 0}

    def hook(module, args, output):
        if isinstance(module, Encoder):
            calls["vae"] += 1
        elif isinstance(module, CLIPTextModel):
            calls["text"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield calls
    handle.remove()


def half_painted(folder):
    """Images whose mirror image differs: a colour on the left half, black on the right."""
    folder.mkdir()
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "prompt"])
        for name, rgb in {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 230)}.items():
            image = Image.new("RGB", (64, 64))
            image.paste(Image.new("RGB", (32, 64), rgb))
            image.save(folder / f"{name}.png")
            writer.writerow([f"{name}.png", f"{name} on the left"])
    return folder


def run(demo, data, out, calls, **extra) -> list[float]:
    """Losses of a 4-step run; `calls` counts from zero."""
    calls.update(vae=0, text=0)
    losses = []
    cfg = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(data),
                            "output_dir": str(out), "sample_every_steps": 0, "sample_prompts": [],
                            "max_train_steps": 4, "save_steps": 0, **extra})
    train(cfg, EventSink([lambda e: e.kind == "progress" and losses.append(e.data["loss"])]))
    return losses


def test_second_run_encodes_nothing_and_trains_identically(demo, tmp_path, encoder_calls):
    data = shutil.copytree(demo.images, tmp_path / "data")
    uncached = run(demo, data, tmp_path / "plain", encoder_calls)
    assert not (data / CACHE_DIR).exists()
    first = run(demo, data, tmp_path / "first", encoder_calls, cache_latents_to_disk=True)
    assert encoder_calls["vae"] > 0 and encoder_calls["text"] > 0
    second = run(demo, data, tmp_path / "second", encoder_calls, cache_latents_to_disk=True)
    assert encoder_calls == {"vae": 0, "text": 0}
    assert second == first == uncached


def test_flips_are_cached_apart_and_broken_files_recomputed(demo, tmp_path, encoder_calls):
    data = half_painted(tmp_path / "data")
    uncached = run(demo, data, tmp_path / "plain", encoder_calls, random_flip=True)
    run(demo, data, tmp_path / "first", encoder_calls, random_flip=True, cache_latents_to_disk=True)
    files = sorted((data / CACHE_DIR).glob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # cut short, as by a crash mid-copy
    files[1].write_bytes(b"not a safetensors file")
    repaired = run(demo, data, tmp_path / "repaired", encoder_calls, random_flip=True, cache_latents_to_disk=True)
    assert 1 <= encoder_calls["vae"] + encoder_calls["text"] <= 2
    for path in files[:2]:
        with safe_open(path, framework="pt") as fh:
            assert fh.metadata()["key"]
    cached = run(demo, data, tmp_path / "cached", encoder_calls, random_flip=True, cache_latents_to_disk=True)
    assert encoder_calls == {"vae": 0, "text": 0}
    # Float noise only: the uncached run encodes whole batches, the cache what is missing. A flipped sample reading
    # unflipped latents changes these losses by 1e-3 and more.
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=0)
    torch.testing.assert_close(repaired, uncached, rtol=1e-5, atol=0)


def test_unwritable_cache_is_reported_once_and_computing_goes_on(tmp_path):
    (tmp_path / "dataset").write_text("a file where the cache folder would go")
    logs, calls = [], []

    def compute(positions):
        calls.append(positions)
        return [{"x": torch.full((2,), float(p))} for p in positions]

    cache = DiskCache(tmp_path / "dataset" / CACHE_DIR, logs.append)
    assert [f["x"][0].item() for f in cache.fetch(["a", "b"], compute)] == [0.0, 1.0]
    cache.fetch(["a"], compute)
    assert calls == [[0, 1], [0]] and len(logs) == 1 and "continuing without it" in logs[0]


def test_model_identity_follows_its_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"1234")
    before = model_fingerprint(str(model))
    assert model_fingerprint(str(model)) == before
    (model / "weights.safetensors").write_bytes(b"12345")
    assert model_fingerprint(str(model)) != before
