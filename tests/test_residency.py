"""Staged residency, proved without a GPU: the full-size reference models (Flux.1 dev, SDXL, SD1.5) built on the meta
device from the shipped configs go through the engine's phases with the fitted config of every reference card; the
residency ledger (what the one moving function put on the device, at storage dtype) must stay within the plan's
figure of each phase, the plan within the card, fp8 / NF4 never put a 16-bit denoiser on the card, and T5 never
meets the denoiser there. Then the tiny models train on the CPU through the same phases."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

import train as train_cli
from studio.events import EventSink
from studio.families import get_family
from studio.loop import train
from studio.plan.memory import CUDA_CONTEXT_GB, weight_dtype
from studio.plan.models import ModelSource, build_image_components
from studio.plan.reference import CARDS_GB, fit_reference
from studio.residency import GB, META, PHASES, Residency, decide
from tests.test_flux_training import flux_config
from tests.test_image_training import solid_colours

IMAGE_REFERENCES = ("SD1.5", "SDXL", "Flux.1")


def engine_residency(fitted) -> Residency:
    """The engine's residency for `fitted` on its card, on freshly built full-size meta components: the phases in
    the engine's order, LoRA attached after the denoiser arrives (as DiffusionEngine.load does)."""
    cfg, family = fitted.cfg, get_family(fitted.family)
    recipe = family.load_recipe()
    dtype = weight_dtype(cfg, on_gpu=True)
    parts = build_image_components(ModelSource(family.config_path, ""))
    for name, module in parts.items():
        module.to(torch.float32 if name == "vae" else dtype)
    denoiser = parts[recipe.denoiser]
    encoders = {name: module for name, module in parts.items() if name.startswith("text_encoder")}
    decisions = decide(cfg, recipe.denoiser, encoders, fitted.plan.card_gb, CUDA_CONTEXT_GB)
    blocks = recipe.swap_blocks(denoiser) if cfg.blocks_to_swap else None
    residency = Residency(parts, decisions, META, dtype, blocks, home=META)
    for phase in ("load", "encode", "cache", "train"):
        residency.enter(phase)
    denoiser.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=list(recipe.targets)))
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # the engine's fp32 LoRA weights
    for phase in ("sample", "validate", "save"):
        residency.enter(phase)
    return residency


SLOW = {("SDXL", 24)}  # the first SDXL plan traces its 1024 px UNet (~25 s); Flux.1's build alone is ~5 s a card
CASES = [pytest.param(name, card, marks=[pytest.mark.slow] if name == "Flux.1" or (name, card) in SLOW else [])
         for name in IMAGE_REFERENCES for card in CARDS_GB]


@pytest.mark.parametrize("name,card", CASES)
def test_every_phase_of_the_planned_config_fits_its_card(name, card):
    fitted = fit_reference(name, card)
    plan, cfg = fitted.plan, fitted.cfg
    assert plan.fits and plan.peak_gb <= card, plan.table()
    planned = {row.name: row.gb for row in plan.phases}
    assert list(planned) == list(PHASES)
    residency = engine_residency(fitted)
    ledger, decisions = residency.ledger, residency.decisions
    for phase in PHASES:
        assert ledger.peak(phase) / GB <= planned[phase] + 1e-9, (phase, ledger.peak(phase) / GB, planned[phase])
    recipe = get_family(fitted.family).load_recipe()
    sixteen_bit = sum(p.numel() for p in residency.components[recipe.denoiser].parameters()
                      if not p.requires_grad) * 2
    on_card = [held[recipe.denoiser] for _, held in ledger.entries if recipe.denoiser in held]
    if cfg.fp8_base:  # 1 byte per weight, a few small layers (proj_out, embeddings) in 16-bit
        assert max(on_card) <= 0.52 * sixteen_bit
    if cfg.load_in_4bit:
        assert max(on_card) <= 0.3 * sixteen_bit
    if decisions.text_cached:  # the text encoders leave before the denoiser arrives
        for phase in PHASES:
            for group in ledger.together(phase):
                assert not (group & set(decisions.encoders) and recipe.denoiser in group), (phase, group)
        assert all(row.gb == 0 for row in plan.rows if row.name.startswith("text_encoder"))


def test_flux_dev_on_8_gb_fits_with_swapped_blocks_and_phase_rows(capsys, tmp_path):
    config = tmp_path / "flux.yaml"
    config.write_text(json.dumps({"preset": "style", "base_model": str(get_family("flux1").config_path),
                                  "train_data_dir": str(tmp_path), "output_dir": str(tmp_path / "out"),
                                  "resolution": 1024}))
    assert train_cli.main(["--config", str(config), "--plan", "--vram-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits the 8 GB card" in out and "at 1024 px" in out
    assert "blocks_to_swap = " in out and "blocks in CPU memory" in out
    assert all(f"· {phase} " in out for phase in PHASES)
    assert len(out.splitlines()) <= 45  # short enough to read


def test_sdxl_8_gb_caches_latents_with_the_vae_alone():
    """The 2026-12-04 miss: SDXL's 8 GB plan ran out of memory while caching latents (6.84 GB held + a 512 MiB VAE
    feature map) because the whole pipeline was on the card. Now the cache phase holds the VAE only."""
    plan = fit_reference("SDXL", 8).plan
    cache = next(row for row in plan.phases if row.name == "cache")
    assert cache.note.startswith("vae;") and cache.gb < 2.5


def test_tiny_flux_moves_through_the_phases_once_each(demo, tmp_path):
    """One log line per phase, the first time it is entered (samples come back to the sample phase each time)."""
    events = []
    cfg = flux_config(demo.flux, solid_colours(tmp_path / "colours"), tmp_path / "run", max_train_steps=2,
                      fp8_base=True, sample_every_steps=1, sample_prompts=["a red picture"],
                      sample_inference_steps=2)
    result = train(cfg, EventSink([events.append]))
    lines = [e.message for e in events if e.kind == "log" and e.message.startswith("Phase ")]
    assert [e.data["phase"] for e in events if "phase" in e.data] == [line.split(":")[0][6:] for line in lines]
    phases = [line.split(":")[0].removeprefix("Phase ") for line in lines]
    assert phases[:3] == ["encode", "cache", "train"] and {"sample", "save"} <= set(phases)
    assert len(phases) == len(set(phases))
    assert "transformer" not in lines[0] and "text_encoder_2" in lines[0]  # T5 encodes alone
    assert lines[1].startswith("Phase cache: on the cpu: vae ")
    assert len(list((result.output_dir / "samples").glob("*.png"))) == 2  # drawn from the cached prompt embeddings


def test_nf4_with_swapped_blocks_loads_quantized_and_trains(demo, tmp_path, monkeypatch):
    """NF4 and block swap together through the engine (bitsandbytes' CPU backend here): every base linear layer is
    quantized, the swapped ones included, the train phase's line says what streams, and steps run."""
    import bitsandbytes as bnb

    from studio.engines import make_engine
    from studio.engines.diffusion import DiffusionEngine

    monkeypatch.setattr(DiffusionEngine, "four_bit_needs_cuda", False)
    cfg = flux_config(demo.flux, solid_colours(tmp_path / "colours"), tmp_path / "run", max_train_steps=2,
                      load_in_4bit=True, blocks_to_swap=2)
    events = []
    engine = make_engine(cfg, torch.device("cpu"), None, EventSink([events.append]))
    engine.load()
    residency = engine.residency
    assert len(residency.swapped) == 2
    for block in residency.blocks:
        bases = [m.base_layer for m in block.modules() if hasattr(m, "base_layer")]
        assert bases and all(isinstance(layer, bnb.nn.Linear4bit) for layer in bases)
    train_line = next(e.message for e in events if e.data.get("phase") == "train")
    assert "(2 transformer blocks streamed from CPU memory)" in train_line
    assert torch.isfinite(torch.tensor(train(cfg).last_loss))
