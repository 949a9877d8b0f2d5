"""Fit a run to the card: the one path from (preset, model, device memory) to a config, for the CLI and the UI.

The user's keys always win. The memory-bound keys they did not set start from the preset's intent (its batch, rank,
resolution) and the plan (studio/plan/memory.py) decides: while the planned peak is over the card, take the next
step of the ladder — gradient checkpointing, halve the micro-batch (accumulation keeps the effective batch), fp8 /
4-bit weights, 8-bit AdamW, block swap (images), a lower resolution / max_length — then give the micro-batch back
while it still fits.
The rank is left alone: LoRA weights are a few MB, lowering them saves nothing. Every decided key gets a reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from studio.backoff import PLAN_LADDER, apply_backoff, next_backoff
from studio.config import RunConfig, config_from_dict
from studio.hardware import Hardware, auto_precision, detect
from studio.plan.memory import plan_memory
from studio.plan.report import MemoryPlan
from studio.families import resolve_family

MAX_STEPS = 64  # ladder steps before giving up (each halves or lowers something: far more than ever needed)


@dataclass
class Fitted:
    cfg: RunConfig
    family: str
    plan: MemoryPlan
    reasons: dict[str, str]  # memory-bound key → why it has its value (keys the user set are not here)

    def report(self) -> str:
        """The resolved keys with their reasons, then the plan: what `train.py` prints at start."""
        lines = [f"Fitted to {_card_text(self.plan.card_gb)} ({self.family}; {self.plan.source}):"]
        lines += [f"  {key} = {getattr(self.cfg, key)}: {why}" for key, why in self.reasons.items()]
        return "\n".join(lines + ["Memory plan:", self.plan.table()])


def card_memory(cfg: RunConfig, hardware: Hardware) -> float | None:
    """The GB the run is planned for: vram_budget_gb, else the CUDA card present, else None (CPU / MPS)."""
    if cfg.vram_budget_gb:
        return cfg.vram_budget_gb
    return hardware.total_gb if hardware.device == "cuda" else None


def fit_config(data: dict, hardware: Hardware | None = None, *, check_paths: bool = True,
               base_dir: Path | None = None) -> Fitted:
    """Validate `data` (a user's flat config, preset not yet merged) and fill the memory-bound keys it leaves open."""
    cfg = config_from_dict(data, check_paths=check_paths, base_dir=base_dir)
    hardware = hardware or detect()
    user = {key for key, value in data.items() if value is not None} - {"preset"}
    record = resolve_family(cfg)
    family = record.name
    card = card_memory(cfg, hardware)
    reasons: dict[str, str] = {}

    def put(key: str, value, why: str) -> None:
        nonlocal cfg
        if key not in user:
            cfg = dataclasses.replace(cfg, **{key: value})
            reasons[key] = why

    if cfg.mixed_precision == "auto":
        gpu = card is not None
        put("mixed_precision", *auto_precision("cuda" if gpu else hardware.device, hardware.bf16 if gpu else False))
    # The family's own values: over a generic preset's (style, character), under a preset made for the family
    # (one that names its model_family) and under the user's.
    preset = _preset_keys(cfg)
    if record.native_resolution and "resolution" not in preset:
        put("resolution", record.native_resolution, f"{record.label}'s native resolution")
    for key, value in record.preset_values.items():
        if "model_family" not in preset or key not in preset:
            put(key, value, f"{record.label}'s value for the {cfg.preset or 'default'} preset")
    plan = plan_memory(cfg, family, card)
    intent = cfg
    for _ in range(MAX_STEPS):
        if plan.fits:
            break
        step = next_backoff(cfg, PLAN_LADDER, keep=user)
        if step is None:
            break
        cfg = apply_backoff(cfg, step)
        plan = plan_memory(cfg, family, card)
    if not plan.fits:  # nothing fits: keep the preset's quality, the plan says what is over
        cfg = dataclasses.replace(cfg, **{key: getattr(intent, key) for key in QUALITY_KEYS})
        plan = plan_memory(cfg, family, card)
    cfg, plan = _regrow_batch(cfg, intent, user, family, card, plan)
    for key in MEMORY_KEYS:
        if key not in user and (key in reasons or getattr(cfg, key) != getattr(intent, key) or key in BASE_KEYS):
            reasons[key] = _why(key, intent, cfg, plan, reasons.get(key))
    return Fitted(cfg, family, plan, {k: reasons[k] for k in (*record.preset_values, *MEMORY_KEYS) if k in reasons})


# --- helpers ----------------------------------------------------------------------------------------------------------

QUALITY_KEYS = ("resolution", "max_length")  # lowered only when that makes the run fit
MEMORY_KEYS = ("mixed_precision", "batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
               "load_in_4bit", "fp8_base", "optimizer", "blocks_to_swap", "offload_activations", "resolution",
               "max_length")
BASE_KEYS = ("batch_size", "gradient_checkpointing")  # always explained, changed or not


def _regrow_batch(cfg, intent, user, family, card, plan):
    """After the ladder (checkpointing, 4-bit... free a lot), give back micro-batch while it still fits."""
    while (cfg.batch_size < intent.batch_size and cfg.gradient_accumulation_steps % 2 == 0
           and not user.intersection(("batch_size", "gradient_accumulation_steps"))):
        bigger = dataclasses.replace(cfg, batch_size=cfg.batch_size * 2,
                                     gradient_accumulation_steps=cfg.gradient_accumulation_steps // 2)
        bigger_plan = plan_memory(bigger, family, card)
        if not bigger_plan.fits:
            break
        cfg, plan = bigger, bigger_plan
    return cfg, plan


def _why(key: str, intent: RunConfig, cfg: RunConfig, plan: MemoryPlan, given: str | None) -> str:
    before, after, card = getattr(intent, key), getattr(cfg, key), _card_text(plan.card_gb)
    if before == after:
        return given or (f"{after}: fits {card} as it is" if plan.fits
                         else f"{after}: kept (nothing the fit may change brings the plan under {card})")
    if key == "gradient_accumulation_steps":
        return f"{before}→{after}: keeps the effective batch at {cfg.batch_size * after * cfg.num_processes}"
    return f"{before}→{after} to fit {card}" + ("" if plan.fits else " (still over: see the plan)")


def _card_text(card_gb: float | None) -> str:
    return "the CPU (system RAM)" if card_gb is None else f"a {card_gb:g} GB card"


def _preset_keys(cfg: RunConfig) -> set[str]:
    from studio.config import load_preset
    return set(load_preset(cfg.preset)) if cfg.preset else set()
