"""The planner's longest context (studio.plan.longest) and the fit's offloading rung, on Llama 3.1 8B (meta device)."""

import dataclasses

import pytest

from studio.plan.longest import STEP, longest_max_length, longest_text
from studio.plan.memory import plan_memory
from studio.plan.reference import fit_reference


@pytest.mark.slow
def test_8b_qlora_r32_on_24gb_plans_at_least_4x_the_plain_loops_context():
    """The plain transformers+peft loop trained 6,656 tokens on a 24 GB card (H200, 2026-12-04); the target is 4×."""
    cfg = fit_reference("Llama 3.1 8B", 24, load_in_4bit=True, lora_rank=32, gradient_checkpointing=True,
                        batch_size=1, gradient_accumulation_steps=1).cfg
    longest = longest_max_length(cfg, "llm", 24)
    assert longest >= 4 * 6656 and longest % STEP == 0
    at = {n: plan_memory(dataclasses.replace(cfg, max_length=n), "llm", 24) for n in (longest, longest + STEP)}
    assert at[longest].fits and not at[longest + STEP].fits  # the search's answer is the plan's edge
    text = longest_text(cfg, "llm", 24)
    offloaded = int(text.split("offload_activations: true: ")[1].rstrip(".").replace(",", ""))
    assert f"{longest:,} tokens" in text and offloaded > 1.5 * longest


def test_8gb_card_keeps_2048_tokens_by_offloading_layer_inputs():
    fitted = fit_reference("Llama 3.1 8B", 8, max_length=2048)
    cfg = fitted.cfg
    assert cfg.max_length == 2048 and cfg.load_in_4bit and cfg.offload_activations and fitted.plan.fits
    assert "offload_activations" in fitted.reasons
    assert not plan_memory(dataclasses.replace(cfg, offload_activations=False), "llm", 8).fits


def test_no_longest_line_for_images_or_the_cpu():
    image = fit_reference("SD1.5", 8).cfg
    assert longest_text(image, "sd15", 8) == ""
    llm = fit_reference("Llama 3.1 8B", 24).cfg
    assert longest_text(llm, "llm", None) == ""
