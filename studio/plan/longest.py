"""The longest max_length an LLM config fits on its card: a search over the meta-device plan (planned peak within
the fit's share of the card, report.FITS), printed by `train.py --plan` and compared with the GPU bench's measured
longest context (bench/gpu_context.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from studio.config import RunConfig
from studio.plan.memory import plan_memory
from studio.plan.models import llm_source
from studio.plan.report import FITS

STEP = 256  # tokens: the answer's resolution
PROBES = (2048, 8192)  # two plans give the slope: an LLM's planned peak is affine in max_length


def longest_max_length(cfg: RunConfig, family: str, card_gb: float) -> int:
    """The longest max_length (a multiple of STEP, at most the model's max_position_embeddings) whose plan fits a
    `card_gb` card with `cfg`'s other settings; 0 when not even STEP tokens fit."""
    plans: dict[int, bool] = {}

    def fits(length: int) -> bool:
        if length not in plans:
            plans[length] = plan_memory(dataclasses.replace(cfg, max_length=length), family, card_gb).fits
        return plans[length]

    limit = max(STEP, position_limit(cfg) // STEP * STEP)
    low, high = _bracket(fits, _affine_guess(cfg, family, card_gb, limit), limit)
    while high - low > STEP:
        middle = (low + high) // 2 // STEP * STEP
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def position_limit(cfg: RunConfig) -> int:
    """The model's longest context (max_position_embeddings of its config.json)."""
    config = json.loads((llm_source(cfg.base_model).folder / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 2**17)


def longest_text(cfg: RunConfig, family: str, card_gb: float | None) -> str:
    """The `--plan` line for an LLM config on a card ("" for images and CPU plans), with what offloading the
    checkpointed layer inputs would give when it is off."""
    if cfg.is_image or card_gb is None:
        return ""
    longest = longest_max_length(cfg, family, card_gb)
    limit = position_limit(cfg)
    text = (f"Longest max_length that fits this {card_gb:g} GB card with these settings: {longest:,} tokens"
            + (" (the model's own limit)" if longest >= limit // STEP * STEP else "") + ".")
    if cfg.gradient_checkpointing and not cfg.offload_activations:
        offloaded = longest_max_length(dataclasses.replace(cfg, offload_activations=True), family, card_gb)
        text += f" With offload_activations: true: {offloaded:,}."
    return text


def _affine_guess(cfg: RunConfig, family: str, card_gb: float, limit: int) -> int:
    low, high = (plan_memory(dataclasses.replace(cfg, max_length=n), family, card_gb).peak_gb for n in PROBES)
    slope = (high - low) / (PROBES[1] - PROBES[0])
    guess = PROBES[1] + (FITS * card_gb - high) / slope if slope > 0 else limit
    return int(min(max(guess, STEP), limit)) // STEP * STEP


def _bracket(fits: Callable[[int], bool], guess: int, limit: int) -> tuple[int, int]:
    """(a length that fits or 0, a longer one that does not or limit + STEP), galloping from `guess`."""
    step = STEP
    if fits(guess):
        low = guess
        while low < limit:
            longer = min(low + step, limit)
            if not fits(longer):
                return low, longer
            low, step = longer, step * 2
        return limit, limit + STEP
    high = guess
    while high > STEP:
        shorter = max(high - step, STEP)
        if fits(shorter):
            return shorter, high
        high, step = shorter, step * 2
    return 0, STEP
