"""The out-of-memory ladder: which setting to lower next so a run fits the card, in order.

1. micro-batch: halve `batch_size` and multiply `gradient_accumulation_steps` by the same factor, so the effective
   batch (samples per optimizer update) is unchanged (an odd size drops to its largest proper divisor);
2. gradient checkpointing on;
3. images: more of the denoiser's blocks in CPU memory (`blocks_to_swap`, streamed in as they run);
4. images: `resolution` down one 64 px notch, not below 256 px; text: `max_length` halved, not below 64 tokens
   (a config already below a floor is not lowered).

Pure functions over a RunConfig: the training loop calls them after an out-of-memory error (RUNTIME_LADDER), and the
memory planner calls them, with 4-bit weights and 8-bit AdamW added, to shrink a config until its plan fits
(PLAN_LADDER).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from studio.config import RunConfig
from studio.families import BASE_FORMAT_KEYS, resolve_family

MICRO_BATCH = "micro_batch"
CHECKPOINTING = "checkpointing"
RESOLUTION = "resolution"
MAX_LENGTH = "max_length"
QUANTIZE = "quantize"
OPTIMIZER = "optimizer"
BLOCK_SWAP = "block_swap"
OFFLOAD = "offload"
SWAP_STEPS = 8  # a rung swaps 1/8 of the denoiser's blocks more: few rungs, none far past what the card needs

RESOLUTION_NOTCH = 64
MIN_RESOLUTION = 256
MIN_MAX_LENGTH = 64

_NAMES = {"batch_size": "micro-batch", "gradient_accumulation_steps": "accumulation"}


@dataclass(frozen=True)
class Backoff:
    """One rung of the ladder: the config keys it changes, as key → (old, new)."""
    kind: str
    changes: dict[str, tuple[Any, Any]]

    @property
    def remakes_data(self) -> bool:
        """True when the engine must re-bucket / re-tokenize its data for the new settings."""
        return self.kind in (RESOLUTION, MAX_LENGTH)

    def describe(self, step: int) -> str:
        """'Out of memory at step 312: micro-batch 4→2, accumulation 1→2, continuing'."""
        if self.kind == CHECKPOINTING:
            parts = ["gradient checkpointing on"]
        else:
            parts = [f"{_NAMES.get(key, key)} {old}→{new}" for key, (old, new) in self.changes.items()]
        return f"Out of memory at step {step}: {', '.join(parts)}, continuing"


def effective_batch(cfg: RunConfig) -> int:
    """Samples per optimizer update; a back-off never changes it."""
    return cfg.batch_size * cfg.gradient_accumulation_steps


def lower_micro_batch(cfg: RunConfig) -> Backoff | None:
    if cfg.batch_size <= 1:
        return None
    factor = _smallest_factor(cfg.batch_size)
    accum = cfg.gradient_accumulation_steps
    return Backoff(MICRO_BATCH, {"batch_size": (cfg.batch_size, cfg.batch_size // factor),
                                 "gradient_accumulation_steps": (accum, accum * factor)})


def turn_on_checkpointing(cfg: RunConfig) -> Backoff | None:
    return None if cfg.gradient_checkpointing else Backoff(CHECKPOINTING, {"gradient_checkpointing": (False, True)})


def lower_length(cfg: RunConfig) -> Backoff | None:
    """Images: one resolution notch; text: half the max_length; never below the floor (or below where it is)."""
    if cfg.is_image:
        lower = max(min(MIN_RESOLUTION, cfg.resolution), (cfg.resolution - 1) // RESOLUTION_NOTCH * RESOLUTION_NOTCH)
        return Backoff(RESOLUTION, {"resolution": (cfg.resolution, lower)}) if lower < cfg.resolution else None
    lower = max(min(MIN_MAX_LENGTH, cfg.max_length), cfg.max_length // 2)
    return Backoff(MAX_LENGTH, {"max_length": (cfg.max_length, lower)}) if lower < cfg.max_length else None


def swap_more_blocks(cfg: RunConfig) -> Backoff | None:
    """Images: keep 1/SWAP_STEPS more of the denoiser's blocks in CPU memory, up to all but one (the first block
    stays on the card: its forward starts while the next one is copied)."""
    if not cfg.is_image:
        return None
    from studio.plan.phases import swappable_blocks
    total = swappable_blocks(resolve_family(cfg).name, cfg.base_model)
    if cfg.blocks_to_swap >= total - 1:
        return None
    more = min(total - 1, cfg.blocks_to_swap + max(1, total // SWAP_STEPS))
    return Backoff(BLOCK_SWAP, {"blocks_to_swap": (cfg.blocks_to_swap, more)})


def offload_layer_inputs(cfg: RunConfig) -> Backoff | None:
    """LLMs with checkpointing: each layer's kept input in CPU memory (studio.activation_offload). Planning only."""
    if cfg.is_image or not cfg.gradient_checkpointing or cfg.offload_activations:
        return None
    return Backoff(OFFLOAD, {"offload_activations": (False, True)})


def quantize_weights(cfg: RunConfig) -> Backoff | None:
    """The next smaller base-weight format the family offers: fp8 storage (Flux.1), then 4-bit NF4 (Flux.1; LLMs:
    QLoRA).
    Planning only: a loaded model is not re-quantized mid-run."""
    formats = resolve_family(cfg).quantized_base
    if cfg.load_in_4bit:
        return None
    if "fp8" in formats and not cfg.fp8_base:
        return Backoff(QUANTIZE, {"fp8_base": (False, True)})
    if "nf4" in formats:  # from fp8 storage (Flux.1) or from 16-bit (LLMs)
        return Backoff(QUANTIZE, {"load_in_4bit": (False, True), **({"fp8_base": (True, False)} if cfg.fp8_base
                                                                     else {})})
    return None


def eight_bit_optimizer(cfg: RunConfig) -> Backoff | None:
    """8-bit AdamW state. Planning only: the optimizer state is not converted mid-run."""
    return None if cfg.optimizer != "adamw" else Backoff(OPTIMIZER, {"optimizer": ("adamw", "adamw8bit")})


Rung = Callable[[RunConfig], "Backoff | None"]
# At run time, after an out-of-memory error: what can change without reloading the model.
RUNTIME_LADDER: tuple[Rung, ...] = (lower_micro_batch, turn_on_checkpointing, swap_more_blocks, lower_length)
# Planning ahead (studio/plan/fit.py): checkpointing first, since it keeps the batch (the GPU's efficiency) for
# ~30 % more compute; weight and optimizer formats can still be chosen; block swap (slower steps, same result)
# before resolution / max_length, which come last.
PLAN_LADDER: tuple[Rung, ...] = (turn_on_checkpointing, lower_micro_batch, quantize_weights, eight_bit_optimizer,
                                 swap_more_blocks, offload_layer_inputs, lower_length)


def next_backoff(cfg: RunConfig, ladder: tuple[Rung, ...] = RUNTIME_LADDER,
                 keep: frozenset[str] | set[str] = frozenset()) -> Backoff | None:
    """The first rung of `ladder` that lowers memory use without touching a key in `keep` (the user's own keys),
    or None when nothing is left to lower."""
    for rung in ladder:
        backoff = rung(cfg)
        if backoff and not keep.intersection(backoff.changes):
            return backoff
    return None


def apply_backoff(cfg: RunConfig, backoff: Backoff) -> RunConfig:
    """A copy of `cfg` with the back-off's new values."""
    return dataclasses.replace(cfg, **{key: new for key, (_, new) in backoff.changes.items()})


def exhausted_message(cfg: RunConfig, step: int) -> str:
    """What to change when even the smallest settings run out of memory."""
    floor = f"resolution {cfg.resolution}" if cfg.is_image else f"max_length {cfg.max_length}"
    smaller = [f"{key}: true" for fmt in resolve_family(cfg).quantized_base
               if not getattr(cfg, key := BASE_FORMAT_KEYS[fmt])]
    store = f"set {' or '.join(smaller)}, " if smaller else ""
    if cfg.is_image:
        advice = (f"lower lora_rank, {store}set train_text_encoder: false, use mixed_precision: fp16 or bf16 on a "
                  "GPU, train a smaller model family (SD1.5 rather than SDXL or Flux.1), or use a GPU with more memory")
    else:
        advice = (f"lower lora_rank, {store}use mixed_precision: bf16 on a GPU, train a smaller model, or use a GPU "
                  "with more memory")
    return (f"Out of memory at step {step} even with micro-batch 1, gradient checkpointing on and {floor}. "
            f"To fit this card, {advice}.")


def _smallest_factor(n: int) -> int:
    return next(f for f in range(2, n + 1) if n % f == 0)
