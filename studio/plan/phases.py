"""The memory of each phase of an image run, from the engine's own residency decisions run on the meta device.

studio/residency.py decides what each phase (load, encode, cache, train, sample, validate, save) holds on the card
and records it in a ledger; here the same decisions and the same `Residency.enter` run on the full-size model built on
the meta device (nothing moves, the ledger counts the bytes at storage dtype). Each phase's figure is that phase's
weights from the ledger plus what the phase computes with: LoRA and optimizer state from the train phase on, cached
text embeddings, and the phase's working set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from studio.families import get_family
from studio.plan.models import build_image_components
from studio.plan.report import GB, PlanRow
from studio.residency import META, PHASES, Residency, decide

VAE_LIVE_MAPS = 3  # full-resolution feature maps the VAE holds at once (a conv's input, output and norm), fp32


@dataclass(frozen=True)
class PhaseInputs:
    """What the phases add to their weights, in GB (computed by studio/plan/memory.py from the trace)."""
    lora_and_optimizer: float  # LoRA weights, gradients, optimizer state: on the card from the train phase on
    text_cache: float  # cached caption embeddings, on the card from the encode phase on
    train: float  # the train phase: the sum of the plan's rows (weights, LoRA, optimizer, activations...)
    block_work: float  # one block's activations of one sample: a no-grad forward's working set
    batch_size: int
    lora_weights: float  # one fp32 copy of the LoRA weights: what saving makes contiguous before it goes to the CPU


def run_residency(cfg, family: str, folder: Path, dtype: torch.dtype, card_gb: float | None,
                  context_gb: float) -> Residency:
    """The engine's residency for `cfg`, entered phase by phase on the meta model: its ledger holds each phase."""
    recipe = get_family(family).load_recipe()
    parts = _meta_parts(str(folder), dtype, cfg.fp8_base)
    encoders = {name: module for name, module in parts.items() if name.startswith("text_encoder")}
    decisions = decide(cfg, recipe.denoiser, encoders, card_gb, context_gb)
    blocks = recipe.swap_blocks(parts[recipe.denoiser]) if decisions.blocks_to_swap else None
    residency = Residency(parts, decisions, META, dtype, blocks, home=META)
    for phase in PHASES:
        residency.enter(phase)
    return residency


@lru_cache(maxsize=6)
def _meta_parts(folder: str, dtype: torch.dtype, fp8: bool) -> dict[str, torch.nn.Module]:
    """The pipeline's components on the meta device as the engine stores them: the VAE in fp32, the rest in `dtype`
    (fp8 storage is cast by the Residency, once per cached model)."""
    from studio.plan.models import ModelSource
    parts = build_image_components(ModelSource(Path(folder), ""))
    for name, module in parts.items():
        module.to(torch.float32 if name == "vae" else dtype)
    return parts


@lru_cache(maxsize=16)
def swappable_blocks(family: str, base_model: str) -> int:
    """How many blocks `blocks_to_swap` can count for this model (its recipe's `swap_blocks`, on the meta model)."""
    from studio.plan.models import image_source
    record = get_family(family)
    recipe = record.load_recipe()
    parts = _meta_parts(str(image_source(base_model, record).folder), torch.bfloat16, False)
    return len(recipe.swap_blocks(parts[recipe.denoiser]))


def phase_rows(residency: Residency, inputs: PhaseInputs, resolution: int) -> list[PlanRow]:
    """One row per phase: its planned allocated GB and what is on the card."""
    ledger, decisions = residency.ledger, residency.decisions
    vae = residency.components["vae"]
    width = vae.config.get("block_out_channels", [vae.config.get("base_dim")])[0]  # Qwen-Image's VAE: base_dim
    vae_work = VAE_LIVE_MAPS * width * resolution ** 2 * 4 / GB
    trained = inputs.lora_and_optimizer
    extra = {
        "load": (0.0, "nothing on the card yet"),
        "encode": (inputs.text_cache, "captions and sample prompts encoded"
                   + (" on the CPU (the encoders do not fit the card)" if decisions.encode_on_cpu else "")),
        "cache": (inputs.text_cache + vae_work, "VAE encodes every image once"),
        "train": (inputs.train - ledger.peak("train") / GB, "the rows above"),
        "sample": (trained + inputs.text_cache + max(2 * inputs.block_work, vae_work), "denoiser + VAE decode"),
        "validate": (trained + inputs.text_cache + inputs.block_work * inputs.batch_size, "no gradients"),
        "save": (trained + inputs.lora_weights + inputs.text_cache, "the adapter copied to the CPU"),
    }
    rows = []
    for phase in PHASES:
        weights = ledger.peak(phase) / GB
        added, note = extra[phase]
        held = ", ".join(sorted({c for group in ledger.together(phase) for c in group})) or "no weights"
        rows.append(PlanRow(phase, weights + added, f"{held}; {note}"))
    return rows


def train_weight_rows(residency: Residency, notes: dict[str, str]) -> list[PlanRow]:
    """The train phase's weight rows from the ledger: every component, 0 where the phase keeps it off the card."""
    on_card = residency.ledger.last("train")
    return [PlanRow(f"{name} weights", on_card[name] / GB, notes[name]) if name in on_card else
            PlanRow(f"{name} weights", 0.0, f"{notes[name]}: off the card while training")
            for name in residency.components]
