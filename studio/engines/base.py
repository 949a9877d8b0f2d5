"""The small interface between the one training loop (studio/loop.py) and a model family.

An engine loads the base model with LoRA attached, owns the dataset, computes the loss of a batch, and saves or
exports the adapter. The loop owns everything else: optimizer, schedule, precision, accumulation, checkpoints,
resume, out-of-memory back-off, stop requests and events. When a back-off changes the settings, the loop sets
`engine.cfg` to the new config and calls `enable_gradient_checkpointing()` or `apply_length()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from studio.adapters import network_problems
from studio.config import RunConfig
from studio.errors import StudioError
from studio.events import EventSink
from studio.export.metadata import ImageFacts
from studio.families import BASE_FORMAT_KEYS, Family


@dataclass
class Sample:
    """One sample output: an image file or a text reply, for the prompt that produced it."""
    prompt: str
    image_path: Path | None = None
    text: str | None = None


class Engine(ABC):
    # Asking for 4-bit weights without CUDA is a user error (bitsandbytes' CPU backend is far too slow for real
    # models); tests switch this off to exercise the 4-bit paths on the CPU.
    four_bit_needs_cuda = True

    def __init__(self, cfg: RunConfig, device: torch.device, autocast: torch.dtype | None, events: EventSink):
        self.cfg = cfg
        self.device = device
        self.autocast = autocast  # None = fp32; the frozen base weights are stored in this dtype on GPUs
        self.events = events

    @abstractmethod
    def load(self) -> None:
        """Validate the data, load the base model, attach LoRA (from `init_lora` if set), prepare caches."""

    def check_family_settings(self, family: Family, problems: list[str] | tuple = ()) -> None:
        """The settings `family` must support, in one StudioError: fp8_base / load_in_4bit (one at a time, offered by
        the family, 4-bit only where bitsandbytes runs), the network type, and the engine's own `problems`."""
        cfg = self.cfg
        if cfg.fp8_base and cfg.load_in_4bit:
            raise StudioError("fp8_base and load_in_4bit both choose how the base weights are stored; set one of "
                              "them to false (load_in_4bit is the smaller).")
        offered = [BASE_FORMAT_KEYS[fmt] for fmt in family.quantized_base]
        for key in BASE_FORMAT_KEYS.values():
            if getattr(cfg, key) and key not in offered:
                instead = f" (it offers {' and '.join(offered)})" if offered else ""
                raise StudioError(f"{key} is not available for {family.label} models{instead}; set {key}: false.")
        if cfg.load_in_4bit and self.four_bit_needs_cuda and self.device.type != "cuda":
            raise StudioError("load_in_4bit needs a CUDA GPU: bitsandbytes' 4-bit kernels run there. Set "
                              "load_in_4bit: false to train in 16/32-bit here (use a smaller model if memory is "
                              "short), or train on a machine with an NVIDIA GPU.")
        problems = network_problems(cfg, family.network_types, family.label) + list(problems)
        if problems:
            raise StudioError("\n".join(problems))

    @abstractmethod
    def num_samples(self) -> int:
        """Training samples per epoch (after repeats)."""

    @abstractmethod
    def batches(self, epoch: int, size: int) -> list[list[int]]:
        """The epoch's groups of at most `size` sample indices, one optimizer update each (the loop splits a group
        into micro-batches). A pure function of (seed, epoch, size, data) so resume replays it exactly."""

    @abstractmethod
    def collate(self, indices: list[int], epoch: int) -> Any:
        """Build the batch for `indices` (augmentations seeded by (seed, epoch, index))."""

    @abstractmethod
    def loss(self, batch: Any, rng: torch.Generator) -> torch.Tensor:
        """Mean loss of a batch; `rng` (CPU) drives all random draws so a resumed run draws the same ones."""

    @abstractmethod
    def held_out_batches(self) -> Iterator[tuple[Any, int]]:
        """The held-out samples (validation_split / validation_dir) as (batch, weight) in a fixed order, `weight`
        being what the batch's mean loss averages over; nothing when validation is off."""

    def validation_loss(self) -> float | None:
        """Mean loss on the held-out samples, or None without any. Eval mode, no gradients, and random draws from a
        generator seeded from cfg.seed afresh for every pass: the values compare across steps and runs."""
        rng = torch.Generator().manual_seed(self.cfg.seed)
        total, weights = 0.0, 0
        self.train_mode(False)
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast,
                                                 enabled=self.autocast is not None):
                for batch, weight in self.held_out_batches():
                    total += self.loss(batch, rng).item() * weight
                    weights += weight
        finally:
            self.train_mode(True)
        return total / weights if weights else None

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (an out-of-memory back-off)."""

    @abstractmethod
    def apply_length(self, cfg: RunConfig) -> None:
        """Adopt `cfg`'s resolution (images: re-bucket, re-encode cached latents) or max_length (text: re-tokenize)."""

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """Trainable LoRA parameters as optimizer groups (each with its own 'lr')."""

    @abstractmethod
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights, for checkpoints."""

    @abstractmethod
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `adapter_state()` output (resume)."""

    @abstractmethod
    def export(self, out_dir: Path, metadata: dict[str, str], name: str | None = None) -> list[Path]:
        """Write the deliverable adapter file(s) into `out_dir`; returns their paths, main file first. `name`: an
        adapter exported during the run (just the adapter, under that name) rather than the run's final one."""

    @abstractmethod
    def sample(self, prompts: list[str], out_dir: Path, step: int) -> list[Sample]:
        """Render sample outputs with the current weights (images saved under `out_dir`)."""

    def train_mode(self, training: bool) -> None:
        """Switch the trainable model between train and eval mode."""
        for module in self.trainable_modules():
            module.train(training)

    @abstractmethod
    def trainable_modules(self) -> list[torch.nn.Module]:
        """The modules that carry LoRA layers."""

    def describe(self) -> dict[str, str]:
        """Facts for the export metadata and the log (family, base model...)."""
        return {}

    def header_facts(self) -> ImageFacts | None:
        """Image runs: the family, dataset and captions behind the header's dataset and ModelSpec fields."""
        return None

