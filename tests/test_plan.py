"""The memory plan (studio/plan/): sizes from configs alone, activations traced on the meta device, the fit."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from studio.config import config_from_dict
from studio.families import get_family
from studio.families.sd15 import UNetRecipe
from studio.hardware import Hardware
from studio.plan import probes
from studio.plan.fit import fit_config
from studio.plan.memory import plan_memory
from studio.plan.models import LLM_REFERENCE
from studio.plan.reference import REFERENCES, fit_reference, vram_table

ROOT = Path(__file__).resolve().parent.parent
GPU = Hardware("cuda", "test card", 24.0, 24.0, True)
OLD_GPU = Hardware("cuda", "old card", 11.0, 11.0, False)
CPU = Hardware("cpu", "CPU", None, None, True)
SDXL = str(get_family("sdxl").config_path)
SD15 = str(get_family("sd15").config_path)


def shape(family, base, rank=8, dtype=torch.bfloat16):
    return probes.Shape(family, str(base), rank, None, False, dtype)


def flat_config(tmp_path, base_model, **keys):
    """The lora-scripts seed YAML: no preset, no precision."""
    return {"base_model": str(base_model), "train_data_dir": str(tmp_path), "output_dir": str(tmp_path / "out"),
            "batch_size": 4, "lora_rank": 8, "learning_rate": 2e-4, **keys}


def test_sizes_come_from_the_configs(demo):
    """Tiny demo model: the planned frozen and LoRA parameters are what the real pipeline and peft hold."""
    pipe = StableDiffusionPipeline.from_pretrained(demo.sd15)
    built = probes.build(shape("sd15", demo.sd15, rank=4, dtype=torch.float32))
    assert built.frozen == {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                            for name in ("unet", "text_encoder", "vae")}
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=list(UNetRecipe.targets)))
    assert built.lora_params == sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    # The published SDXL UNet (README in studio/models/configs) at bf16, from the shipped configs: no weights anywhere.
    plan = plan_memory(fit_reference("SDXL", 24).cfg, "sdxl", 24)
    unet = next(row for row in plan.rows if row.name == "unet weights")
    assert unet.gb == pytest.approx(2_567_463_684 * 2 / 2**30)


def test_activations_scale_with_pixels_and_checkpointing_keeps_little():
    sd15 = shape("sd15", SD15)
    at_512, at_1024 = probes.trace(sd15, 512), probes.trace(sd15, 1024)
    # Fused attention makes self-attention linear in pixels; cross-attention over the 77 text tokens does not grow.
    assert 2.5 < at_1024.activations(False) / at_512.activations(False) < 4.0
    assert at_512.activations(True) < 0.3 * at_512.activations(False)
    llm = shape("llm", LLM_REFERENCE)
    assert 1.8 < probes.trace(llm, 2048).activations(True) / probes.trace(llm, 1024).activations(True) < 2.2


def test_flops_of_an_llm_step():
    """Frozen weights: forward 2·P·T, backward only input gradients 2·P·T (P: matmul weights, not the embedding
    table), plus attention."""
    built = probes.build(shape("llm", LLM_REFERENCE))
    tokens = 1024
    flops = probes.flops(shape("llm", LLM_REFERENCE), tokens)
    embedding = built.model.get_input_embeddings().weight.numel()
    dense = 4 * (built.frozen["model"] - embedding) * tokens
    assert dense < flops < 1.15 * dense


def test_fit_sdxl_on_a_24gb_card_keeps_a_real_batch():
    fitted = fit_reference("SDXL", 24)
    assert fitted.plan.fits and fitted.cfg.batch_size >= 2 and fitted.cfg.resolution == 1024
    assert fitted.cfg.batch_size * fitted.cfg.gradient_accumulation_steps == 4  # the preset's effective batch
    assert set(fitted.reasons) >= {"batch_size", "gradient_checkpointing", "mixed_precision"}
    assert all(fitted.reasons.values())


@pytest.mark.slow  # plans every full-size reference on five cards
def test_fit_never_gives_less_for_more_memory():
    for name in REFERENCES:
        previous = None
        for card in (8, 12, 16, 24, 48):
            fitted = fit_reference(name, card)
            if not fitted.plan.fits:  # nothing fits: the preset's quality is kept and the plan says "too big"
                continue
            c = fitted.cfg
            # What the user sees in the adapter first (length, weight format), then speed at the same effective
            # batch (micro-batch, checkpointing off, fewer blocks streamed): bf16 at micro-batch 1 beats NF4 at 2.
            quality = (c.max_length if name.startswith("Llama") else c.resolution, not c.load_in_4bit,
                       not c.fp8_base)
            now = (quality, c.batch_size, not c.gradient_checkpointing, -c.blocks_to_swap)
            if previous:
                assert now >= previous, (name, card, previous, now)
            previous = now


def test_user_keys_always_win():
    # micro-batch 64 without checkpointing: even all blocks swapped at 256 px would not fit (micro-batch 8 does)
    fitted = fit_reference("SDXL", 8, batch_size=64, gradient_checkpointing=False)
    assert fitted.cfg.batch_size == 64 and fitted.cfg.gradient_checkpointing is False
    assert "batch_size" not in fitted.reasons and "gradient_checkpointing" not in fitted.reasons
    assert not fitted.plan.fits and "does not fit" in fitted.plan.summary()
    assert fitted.cfg.resolution == 1024  # nothing fits: quality is not given away for nothing


def test_llm_goes_4bit_when_16bit_weights_do_not_fit():
    assert fit_reference("Llama 3.1 8B", 24).cfg.load_in_4bit is False
    small = fit_reference("Llama 3.1 8B", 16)
    assert small.cfg.load_in_4bit is True and small.plan.fits
    assert "4-bit" in small.plan.table()


def test_auto_precision_on_the_flat_seed_yaml(tmp_path):
    """No preset, no precision: bf16 on a card that has it, fp16 on older cards, fp32 on the CPU."""
    assert fit_config(flat_config(tmp_path, SD15), GPU).cfg.mixed_precision == "bf16"
    assert fit_config(flat_config(tmp_path, SD15), OLD_GPU).cfg.mixed_precision == "fp16"
    on_cpu = fit_config(flat_config(tmp_path, SD15), CPU)
    assert on_cpu.cfg.mixed_precision == "no" and on_cpu.plan.verdict == "cpu"
    assert fit_config(flat_config(tmp_path, SD15, mixed_precision="fp16"), GPU).cfg.mixed_precision == "fp16"


@pytest.mark.slow  # a subprocess CLI run
def test_plan_on_the_cli_loads_no_weights(tmp_path):
    """`--plan` on a folder that holds configs only (no weights at all) prints the table and exits 0."""
    config = tmp_path / "seed.yaml"
    config.write_text(f"base_model: {SDXL}\ntrain_data_dir: {tmp_path}\noutput_dir: {tmp_path / 'out'}\n"
                      "batch_size: 4\nresolution: 1024\nlora_rank: 8\n")
    assert not list(Path(SDXL).rglob("*.safetensors"))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), "--plan",
                             "--vram-gb", "24"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mixed_precision = bf16" in out and "unet weights" in out and "activations" in out
    assert re.search(r"peak +\d+\.\d+ GB +Planned peak .* fits the 24 GB card", out)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_readme_vram_table_is_the_planners():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert vram_table() in readme, "README's VRAM table is stale: paste `python -m studio.plan.reference`"


def test_time_estimate_from_an_earlier_run_on_this_card(demo, tmp_path):
    from studio.loop import train
    from studio.plan.speed import estimate_text, run_signature

    data = {"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
            "output_dir": str(tmp_path / "runs" / "first"), "max_train_steps": 3, "sample_prompts": []}
    first = fit_config(data, CPU)
    signature = run_signature(first.cfg, first.family, CPU.name)
    assert "no estimate yet" in estimate_text(first.cfg, tmp_path / "runs", signature)
    train(first.cfg, fitted=first)
    later = fit_config({**data, "max_train_steps": 3000, "output_dir": str(tmp_path / "runs" / "second")}, CPU)
    text = estimate_text(later.cfg, tmp_path / "runs", signature)
    assert text.startswith("Time: about") and "run first" in text
    bigger = run_signature(fit_config({**data, "resolution": 128}, CPU).cfg, "sd15", CPU.name)
    assert "no estimate yet" in estimate_text(later.cfg, tmp_path / "runs", bigger)  # another size: not comparable


@pytest.mark.slow
def test_flux_dev_tiers_fit_24_16_and_12_gb():
    """Full-size Flux.1 dev from the shipped configs: fp8 storage and checkpointing fit 24 GB at 1024 px; below that
    the fit stores the transformer in NF4."""
    flux = str(get_family("flux1").config_path)
    fitted = {gb: fit_config({"preset": "style", "base_model": flux, "train_data_dir": "x", "output_dir": "y",
                              "vram_budget_gb": gb}, CPU, check_paths=False) for gb in (24, 16, 12)}
    assert fitted[24].plan.fits and fitted[24].cfg.fp8_base and fitted[24].cfg.resolution == 1024
    for gb in (16, 12):
        cfg = fitted[gb].cfg
        assert fitted[gb].plan.fits and cfg.load_in_4bit and not cfg.fp8_base and cfg.resolution == 1024, gb
        nf4 = {row.name: row for row in fitted[gb].plan.rows}["transformer weights"]
        assert 5.5 < nf4.gb < 5.8 and "NF4" in nf4.note  # 11.9 B linear weights at ~0.5 bytes
    rows = {row.name: row for row in fitted[24].plan.rows}
    assert rows["text_encoder_2 weights"].gb == 0 and "off the card" in rows["text_encoder_2 weights"].note
    assert 11.0 < rows["transformer weights"].gb < 11.2  # 11.9 B parameters at one byte each


def test_flux_base_formats_step_from_fp8_to_nf4():
    from studio.backoff import apply_backoff, quantize_weights

    cfg = config_from_dict({"preset": "style", "base_model": str(get_family("flux1").config_path),
                            "train_data_dir": "x", "output_dir": "y"}, check_paths=False)
    first = quantize_weights(cfg)
    assert first.changes == {"fp8_base": (False, True)}
    second = quantize_weights(apply_backoff(cfg, first))
    assert second.changes == {"load_in_4bit": (False, True), "fp8_base": (True, False)}
    assert quantize_weights(apply_backoff(apply_backoff(cfg, first), second)) is None
