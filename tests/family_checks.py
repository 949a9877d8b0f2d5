"""The steps every diffusion family's tests take on its tiny model: load its single file, refuse a variant, train two
steps and read the export, reload the LoRA into the family's diffusers pipeline, resume a stopped run. What differs
per family (its render call, its key names, its header) stays in its test module."""

import logging
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.config import config_from_dict
from studio.events import EventSink
from studio.loop import train
from tests.test_image_training import solid_colours


def assert_single_file_loads(tiny: Path, path: Path, family, pipeline_class):
    """The file is recognised as `family`; its pipeline, the rest from the tiny folder, holds the folder's weights."""
    from studio.families import detect_family
    from studio.models.pipelines import load_pipeline

    assert detect_family("image-generation", str(path)) is family
    pipe, loaded = load_pipeline(str(path), components=str(tiny))
    ours, ref = pipe.transformer.state_dict(), pipeline_class.from_pretrained(tiny).transformer.state_dict()
    assert loaded is family and isinstance(pipe, pipeline_class) and set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def add_tensor(path: Path, key: str) -> Path:
    """The checkpoint with one more (small) tensor: the key a variant of the family is told apart by."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, key: torch.zeros(2, 2)}, str(path))
    return path


def comfy_name(key: str) -> str:
    """`transformer.<module>.lora_A.weight` → the module name ComfyUI looks up (after its `transformer.` prefix)."""
    return key.removeprefix("transformer.").split(".lora_")[0]


def fit_at_full_size(label: str, cards: tuple[int, ...]) -> list:
    """The family's reference model (its shipped configs, traced on the meta device) fitted to each card: it fits,
    at the native 1024 px."""
    from studio.plan.reference import fit_reference

    fits = [fit_reference(label, card) for card in cards]
    for card, fitted in zip(cards, fits):
        assert fitted.plan.fits and fitted.plan.peak_gb <= card, (card, fitted.plan.peak_gb)
        assert fitted.cfg.resolution == 1024
    return fits


def tiny_config(model, data, out, **extra):
    return config_from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
                             "resolution": 64, "lora_rank": 4, "learning_rate": 1e-2, "max_train_steps": 2,
                             "batch_size": 2, "sample_every_steps": 0, "sample_prompts": [], **extra})


def train_and_read_export(model, tmp: Path):
    """Two steps with a sample at the last one; the run trained (finite loss, a sample image, a LoRA B moved off its
    zero start). Returns the result and the exported file's header and tensors."""
    cfg = tiny_config(model, solid_colours(tmp / "colours"), tmp / "run", sample_every_steps=2,
                      sample_inference_steps=2, sample_prompts=["a red picture"])
    result = train(cfg)
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))
    assert list(Path(cfg.output_dir).rglob("step-*.png"))
    with safe_open(str(result.files[0]), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if ".lora_B." in k)
    return result, meta, tensors


def assert_lora_reloads(pipe, render, lora_file, caplog, min_change: float = 1e-3):
    """diffusers loads every key; at weight 0 the render is the base model's, at weight 1 it changes."""
    base = torch.as_tensor(render(pipe))
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(lora_file), adapter_name="trained")
    assert not [r for r in caplog.records if "unexpected key" in r.getMessage().lower()]
    pipe.set_adapters(["trained"], [0.0])
    assert torch.equal(torch.as_tensor(render(pipe)), base)
    pipe.set_adapters(["trained"], [1.0])
    assert (torch.as_tensor(render(pipe)) - base).abs().max() > min_change


def assert_resume_matches_uninterrupted_run(model, tmp: Path):
    """A run stopped at its step-2 save and resumed ends with the weights of one that ran through."""
    data = solid_colours(tmp / "colours")
    common = {"max_train_steps": 4, "save_steps": 2, "caption_dropout": 0.25}
    full = train(tiny_config(model, data, tmp / "full", **common))
    stop = threading.Event()
    first = train(tiny_config(model, data, tmp / "part", **common),
                  EventSink([lambda e: e.kind == "progress" and e.step == 2 and stop.set()]), stop)
    assert first.stopped and first.step == 2
    resumed = train(tiny_config(model, data, tmp / "part", resume_from="latest", **common))
    a, b = load_file(str(full.files[0])), load_file(str(resumed.files[0]))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
