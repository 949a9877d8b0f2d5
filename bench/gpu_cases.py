"""The GPU bench's cases: the planner's config for each (model, card) plus variants, and the rows they start as."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from studio.plan.reference import CARDS_GB, fit_reference

MODEL_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux1": "Flux.1", "llm": "Llama 3.1 8B"}  # studio.plan.reference.REFERENCES keys
IMAGE_PARTS = tuple(family for family in MODEL_NAMES if family != "llm")
# Cases beside the planner's own config on each card: (label, card GB, the user's keys). Keys a user sets are kept
# by the fit, which fits the rest around them.
VARIANTS = {
    "sd15": [("batch 8", 24, {"batch_size": 8}), ("fp16", 8, {"mixed_precision": "fp16"}),
             ("adamw8bit", 8, {"optimizer": "adamw8bit"})],
    "sdxl": [("fp16", 24, {"mixed_precision": "fp16"})],  # adamw8bit: the planner's own 8 GB config uses it
    "flux1": [("fp8", 16, {"fp8_base": True})],  # the planner's 16 GB pick is NF4: fp8 at a lower resolution beside it
    "llm": [("QLoRA", 24, {"load_in_4bit": True}), ("adamw8bit", 16, {"optimizer": "adamw8bit"})],
}
CONTEXT_CARD_GB, CONTEXT_RANK = 24, 32  # the longest-context case: 8B QLoRA r=32 on a 24 GB card


@dataclass
class Case:
    """One planned run: the planner's config for (model, card) with the user's `keys`."""
    family: str  # a MODEL_NAMES key
    label: str  # "planner", or the variant's name
    card_gb: float
    keys: dict = field(default_factory=dict)
    fitted: Any = None  # studio.plan.fit.Fitted
    same_as: str | None = None  # id of the case that runs this very config (on a smaller card)
    skip: str | None = None  # why it is not run

    @property
    def id(self) -> str:
        return f"{self.family}/{self.label}/{self.card_gb:g}"


def plan_cases(families: list[str], cards: tuple = CARDS_GB, fit: Callable = fit_reference) -> list[Case]:
    """The cases of each family: the planner's config on each card, then the variants, each fitted by `fit`
    (studio.plan.reference.fit_reference). Identical configs share one run, on the smallest card that should hold
    it; a config the plan calls too big for its card is not run."""
    cases = []
    for family in families:
        group = [Case(family, "planner", card) for card in cards]
        group += [Case(family, label, card, dict(keys)) for label, card, keys in VARIANTS[family]]
        for case in group:
            case.fitted = fit(MODEL_NAMES[family], case.card_gb, **case.keys)
        _share_runs(group)
        cases += group
    return cases


def signature(cfg) -> str:
    """The config minus the card it was fitted for: equal signatures train the very same way."""
    values = dataclasses.asdict(cfg)
    values.pop("vram_budget_gb", None)
    return json.dumps(values, sort_keys=True, default=str)


def _share_runs(cases: list[Case]) -> None:
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(signature(case.fitted.cfg), []).append(case)
    for group in groups.values():
        for case in group:
            if case.fitted.plan.verdict == "too big":
                case.skip = f"the plan says too big ({case.fitted.plan.peak_gb:.1f} GB on a {case.card_gb:g} GB card)"
        runnable = [case for case in group if case.skip is None]
        if runnable:
            runner = min(runnable, key=lambda case: case.card_gb)
            for case in runnable:
                if case is not runner:
                    case.same_as = runner.id


def describe_cfg(cfg, family: str) -> str:
    """'4×1, 512 px, bf16, adamw, ckpt off, r8': what the fit decided, in one cell."""
    length = f"{cfg.max_length} tok" if family == "llm" else f"{cfg.resolution} px"
    storage = "NF4+" if cfg.load_in_4bit else "fp8+" if cfg.fp8_base else ""
    precision = f"{storage}{cfg.mixed_precision}"
    return (f"{cfg.batch_size}×{cfg.gradient_accumulation_steps}, {length}, {precision}, {cfg.optimizer}, "
            f"ckpt {'on' if cfg.gradient_checkpointing else 'off'}, r{cfg.lora_rank}")


def case_row(case: Case) -> dict:
    """A result row with what is known before running: the fitted config and its plan."""
    cfg, plan = case.fitted.cfg, case.fitted.plan
    row = {"id": case.id, "kind": "run", "family": case.family, "model": MODEL_NAMES[case.family],
           "case": case.label, "card_gb": case.card_gb, "config": describe_cfg(cfg, case.family),
           "batch_size": cfg.batch_size, "accumulation": cfg.gradient_accumulation_steps,
           "length": cfg.max_length if case.family == "llm" else cfg.resolution,
           "planned_peak_gb": plan.peak_gb, "planned_alloc_gb": plan.allocated_gb, "verdict": plan.verdict,
           "planned_phases_gb": {phase.name: phase.gb for phase in plan.phases},
           "same_as": case.same_as, "status": "pending"}
    if case.skip:
        row["status"] = f"not run: {case.skip}"
    elif case.same_as:
        row["status"] = f"same config as {case.same_as}"
    return row
