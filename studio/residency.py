"""Staged residency: which model components of an image run are on the training device in each phase, and the one
function that moves them there, in their storage format.

A run goes through phases — load, encode (frozen text encoders turn every caption and sample prompt into embeddings),
cache (the VAE turns every image into latents), train, sample, validate, save — and each holds on the card only what
it needs: the text encoders leave before the denoiser arrives, the VAE comes back only to decode samples. The
denoiser arrives already in its storage format (fp8: cast on the CPU before it moves; NF4: quantized layer by layer
on its way), so the card never holds a 16-bit copy of it; with `blocks_to_swap` its last blocks stay in CPU memory
and are streamed in by studio.block_swap.

`Residency.enter(phase)` is the only place a model component changes device. It records (phase, component, bytes)
in a `Ledger`. The memory planner runs the same decisions and the same `enter` on the meta device (nothing moves
there; the ledger still counts), so the plan's phases and the engine's are one computation with two readers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from studio.block_swap import IN_FLIGHT, check_count

PHASES = ("load", "encode", "cache", "train", "sample", "validate", "save")
GB = 2**30
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64, fp32 per 256 absmax (double quant)
ENCODE_WORKING = 1.15  # encoder weights × this: room for a chunk of captions' activations while encoding
META = torch.device("meta")
# Layers fp8 storage leaves in 16-bit: diffusers' defaults without "norm", which skips a norm's whole subtree and so
# the modulation linears inside (Flux's norm1.linear: 3.2 B of 11.9 B weights); kohya's fp8_base stores those in fp8
# too. Norm layers themselves are never cast (layerwise casting only casts linear and conv layers).
FP8_SKIP = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$")


@dataclass(frozen=True)
class Decisions:
    """What each phase holds on the device; made once per run by `decide`, read by the engine and the planner."""
    denoiser: str  # the pipeline attribute of the denoiser ("unet", "transformer")
    encoders: tuple[str, ...]  # the text encoders' attributes
    text_cached: bool  # captions encoded once up front (frozen encoders, fixed captions)
    latents_cached: bool  # images encoded once up front by the VAE
    encode_on_cpu: bool  # the card cannot hold the text encoders: they encode on the CPU
    storage: str | None  # the denoiser's storage format: "fp8", "nf4" or None (the 16-bit / fp32 dtype)
    blocks_to_swap: int

    def on_device(self, phase: str) -> tuple[str, ...]:
        encoders = () if self.text_cached else self.encoders  # training text through them: needed every step
        if phase == "load":
            return ()
        if phase == "encode":  # only runs when the text is cached; the CPU encodes what the card cannot hold
            return self.encoders if self.text_cached and not self.encode_on_cpu else ()
        if phase == "cache":
            return ("vae",)
        if phase == "sample":
            return (self.denoiser, "vae", *encoders)
        return (self.denoiser, *(() if self.latents_cached else ("vae",)), *encoders)  # train, validate, save


def decide(cfg, denoiser: str, encoders: dict[str, torch.nn.Module], card_gb: float | None,
           context_gb: float = 0.0) -> Decisions:
    """The run's residency decisions from its config, its text encoders (their bytes as stored) and the card
    (None: CPU, where everything is 'on the device')."""
    text_cached = not cfg.train_text_encoder and not cfg.shuffle_tags
    encoder_gb = sum(module_bytes(m) for m in encoders.values()) / GB
    from studio.plan.report import FITS
    too_big = card_gb is not None and encoder_gb * ENCODE_WORKING + context_gb > FITS * card_gb
    storage = "fp8" if cfg.fp8_base else "nf4" if cfg.load_in_4bit else None
    return Decisions(denoiser, tuple(encoders), text_cached, cfg.cache_latents and not cfg.random_flip,
                     text_cached and too_big, storage, cfg.blocks_to_swap)


def module_bytes(module: torch.nn.Module, nf4: bool = False, skip: frozenset[int] = frozenset()) -> int:
    """Bytes of `module`'s parameters and buffers as stored (an NF4 layer's packed data as it is); with `nf4`, linear
    weights not yet quantized count as NF4 (the planner's meta model cannot be quantized). Submodules whose id is in
    `skip` (swapped blocks) are left out."""
    if id(module) in skip:
        return 0
    total = sum(module_bytes(child, nf4, skip) for child in module.children())
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if nf4 and name == "weight" and type(module) is torch.nn.Linear:
            total += int(tensor.numel() * NF4_BYTES)
        else:
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class Ledger:
    """Per phase entry: component → bytes it holds on the device, at its storage dtype."""
    entries: list[tuple[str, dict[str, int]]] = field(default_factory=list)

    def record(self, phase: str, resident: dict[str, int]) -> None:
        self.entries.append((phase, dict(resident)))

    def peak(self, phase: str) -> int:
        return max((sum(r.values()) for p, r in self.entries if p == phase), default=0)

    def last(self, phase: str) -> dict[str, int]:
        """What the latest entry of `phase` held."""
        return next((r for p, r in reversed(self.entries) if p == phase), {})

    def together(self, phase: str) -> set[frozenset[str]]:
        """The sets of components that were on the device at once in `phase`."""
        return {frozenset(r) for p, r in self.entries if p == phase}


class Residency:
    """Moves the components of one image run between `home` (the CPU; the meta device when planning) and `device`,
    one phase at a time, in their storage format, and records each phase in `ledger`."""

    def __init__(self, components: dict[str, torch.nn.Module], decisions: Decisions, device: torch.device,
                 compute_dtype: torch.dtype, swap_blocks: list[torch.nn.Module] | None = None,
                 home: torch.device = torch.device("cpu"), log: Callable[..., None] | None = None):
        self.components, self.decisions, self.device, self.home = components, decisions, device, home
        self.compute_dtype, self.log = compute_dtype, log
        self.ledger = Ledger()
        self.phase: str | None = None
        self.blocks = list(swap_blocks or [])
        count = decisions.blocks_to_swap
        check_count(count, len(self.blocks))  # too many: one clear message at load (and in the plan)
        self.swapped = self.blocks[len(self.blocks) - count:] if count else []
        self._skip = frozenset(id(m) for m in self.swapped)
        self._swap = None
        self._streaming = False
        self._logged: set[str] = set()
        denoiser = components[decisions.denoiser]
        if decisions.storage == "fp8" and not getattr(denoiser, "_studio_fp8", False):
            # Cast where the weights are (the CPU): the 16-bit denoiser never reaches the card.
            from diffusers.hooks import apply_layerwise_casting  # not the model's method: it adds back "norm"
            apply_layerwise_casting(denoiser, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                    skip_modules_pattern=FP8_SKIP)
            denoiser._studio_fp8 = True

    @property
    def encode_device(self) -> torch.device:
        return self.home if self.decisions.encode_on_cpu and self.home.type != "meta" else self.device

    def enter(self, phase: str) -> None:
        """Put on the device exactly what `phase` needs (the rest goes home) and record it."""
        wanted = self.decisions.on_device(phase)
        for name, module in self.components.items():
            if name not in wanted:
                self._place(name, module, self.home)
        for name in wanted:
            self._place(name, self.components[name], self.device)
        if self._streaming and self.decisions.denoiser in wanted:
            self._attach_swap()
        resident = {name: self._bytes_on_device(name) for name in wanted}
        self.ledger.record(phase, resident)
        self.phase = phase
        if phase not in self._logged and self.log:
            self._logged.add(phase)
            self.log(self._describe(phase, resident), phase=phase,
                     on_device={name: round(n / GB, 3) for name, n in resident.items()})

    def stream_blocks(self) -> None:
        """Start streaming the swapped blocks, from now on whenever the denoiser is on the device (called after LoRA
        is attached: its weights go to the device, the frozen ones stream)."""
        self._streaming = bool(self.swapped) and self.home.type != "meta"
        if self.decisions.denoiser in self.decisions.on_device(self.phase or "load"):
            self._attach_swap()

    def swap(self, count: int, blocks: list[torch.nn.Module]) -> None:
        """Stream the last `count` of `blocks` from now on (a back-off raised blocks_to_swap mid-run)."""
        if self._swap is not None:
            self._swap.detach()
            self._swap = None
        self.decisions = dataclasses.replace(self.decisions, blocks_to_swap=count)
        self.blocks, self.swapped = list(blocks), list(blocks[len(blocks) - count:])
        self._skip = frozenset(id(m) for m in self.swapped)
        self.stream_blocks()

    def _attach_swap(self) -> None:
        if self._streaming and self._swap is None:
            from studio.block_swap import BlockSwap
            self._swap = BlockSwap(self.blocks, len(self.swapped), self.device).attach()

    def _place(self, name: str, module: torch.nn.Module, target: torch.device) -> None:
        if name != self.decisions.denoiser:
            if self.home != self.device and _device_of(module) != target:
                module.to(target)
            return
        if target == self.device:
            self._quantize(module)
            if self._swap is None and self.home not in (self.device, META):
                _move(module, target, self._skip)
            return
        if self._swap is not None:  # the swapped blocks' hooks go before the denoiser leaves
            self._swap.detach()
            self._swap = None
        if self.home != self.device:
            module.to(target)

    def _quantize(self, denoiser: torch.nn.Module) -> None:
        """NF4 storage, once, on the denoiser's first way to the device: layer by layer, so no 16-bit copy of it is
        ever there (the swapped blocks go back to the CPU right after). The meta model of the plan stays as it is."""
        if self.decisions.storage != "nf4" or getattr(denoiser, "_studio_nf4", False) or self.home == META:
            return
        from studio.models.nf4 import quantize_linears_nf4
        for block in self.swapped:  # quantized on the device (fast), then home: one block on the card at a time
            quantize_linears_nf4(block, self.device, self.compute_dtype)
            block.to(self.home)
        quantize_linears_nf4(denoiser, self.device, self.compute_dtype)
        denoiser._studio_nf4 = True

    def _bytes_on_device(self, name: str) -> int:
        module = self.components[name]
        if name != self.decisions.denoiser:
            return module_bytes(module)
        nf4 = self.decisions.storage == "nf4"
        window = max((module_bytes(b, nf4) for b in self.swapped), default=0) * min(IN_FLIGHT, len(self.swapped))
        return module_bytes(module, nf4, self._skip) + window

    def _describe(self, phase: str, resident: dict[str, int]) -> str:
        where = self.device.type if self.home.type != "meta" else "card"
        held = ", ".join(f"{name} {n / GB:.2f} GB" for name, n in resident.items()) or "no model weights"
        swap = (f" ({len(self.swapped)} {self.decisions.denoiser} blocks streamed from CPU memory)"
                if self.swapped and self.decisions.denoiser in resident else "")
        encode = " (text encoders run on the CPU: they do not fit the card)" if (
            phase == "encode" and self.decisions.encode_on_cpu) else ""
        return f"Phase {phase}: on the {where}: {held}{swap}{encode}."


def _device_of(module: torch.nn.Module) -> torch.device | None:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else None


def _move(module: torch.nn.Module, target: torch.device, skip: frozenset[int]) -> None:
    """`module.to(target)`, leaving the submodules in `skip` (swapped blocks) where they are."""
    if not skip or not any(id(m) in skip for m in module.modules()):
        module.to(target)
        return
    for child in module.children():
        if id(child) not in skip:
            _move(child, target, skip)
    for key, param in module._parameters.items():
        if param is not None:
            param.data = param.data.to(target)
    for key, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[key] = buffer.to(target)
