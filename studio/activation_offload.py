"""Gradient checkpointing whose kept tensors wait in CPU memory: the `offload_activations` key.

Checkpointing keeps only each layer's input (for Llama 3.1 8B: tokens × 4,096 × 2 bytes per layer, 32 layers,
7 GB at 26k tokens) and recomputes the rest in the backward. Here that input, too, goes to pinned CPU memory as
the forward passes (a copy on a side stream, so the GPU keeps computing) and comes back one layer ahead of the
backward: the card holds two layer inputs (the one recomputed, the next arriving), not every one (unsloth's
"unsloth" checkpointing, TRL's activation offloading).

It is a reentrant checkpoint (the layer runs without autograd in the forward and again with it in the backward),
so it restores what the recompute must see again: the autocast settings and the RNG state (LoRA dropout).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

# An input that always wants a gradient: without it a layer whose inputs do not (the first one, after a frozen
# embedding) would give outputs without a graph, and its LoRA weights no gradients.
_ANCHOR = torch.empty(0, requires_grad=True)


def use_offloaded_checkpointing(model: torch.nn.Module) -> None:
    """Make a transformers model's checkpointed layers (gradient checkpointing already on) offload their inputs."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = offloaded_checkpoint


def offloaded_checkpoint(run: Callable, *args: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint(run, *args)` with the tensor arguments kept in CPU memory."""
    if not torch.is_grad_enabled():  # no backward to keep anything for
        return run(*args)
    return _OffloadedCheckpoint.apply(run, _ANCHOR, *args)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable, anchor: torch.Tensor, *args: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        ctx.run, ctx.device = run, device
        ctx.wants_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        ctx.autocast = _autocast_state(device.type)
        ctx.rng = _rng_state(device)
        ctx.held = _Held(args, device)
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        args = ctx.held.take(ctx.wants_grad)
        ctx.held = None
        with torch.enable_grad(), torch.random.fork_rng(devices=_cuda_devices(ctx.device)), \
                torch.autocast(ctx.device.type, **ctx.autocast):
            _set_rng_state(ctx.device, ctx.rng)
            outputs = ctx.run(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, None, *(a.grad if wants else None for a, wants in zip(args, ctx.wants_grad)))


class _Held:
    """One layer's inputs: copied to pinned CPU memory on a side stream as the forward passes, and copied back on
    that stream one layer early: the backward of a layer starts fetching the input of the layer before it, whose
    backward comes next, so the copy overlaps this layer's recompute. On the CPU they stay as they are."""
    _last: "weakref.ref[_Held] | None" = None  # the layer before, in forward order

    def __init__(self, args: tuple, device: torch.device):
        self.device, self.previous = device, _Held._last
        _Held._last = weakref.ref(self)
        self.host = [_to_host(a) if isinstance(a, torch.Tensor) else a for a in args]
        self.copied = _record(device)
        self.back: list | None = None
        self.arrived = None

    def fetch(self) -> None:
        if self.back is not None or self.host is None:
            return
        if self.device.type != "cuda":
            self.back = self.host
            return
        stream = _side_stream(self.device)
        stream.wait_event(self.copied)  # the copy to the CPU is complete
        with torch.cuda.stream(stream):
            self.back = [a.to(self.device, non_blocking=True) if isinstance(a, torch.Tensor) else a
                         for a in self.host]
        self.arrived = _record(self.device)

    def take(self, wants_grad: list[bool]) -> list:
        """The inputs on the device, ready for the recompute (and the layer before starts coming back)."""
        self.fetch()
        if self.arrived is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.arrived)
            for tensor in self.back:
                if isinstance(tensor, torch.Tensor):
                    tensor.record_stream(current)  # made on the side stream, used and freed on this one
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.fetch()
        args = [a.detach().requires_grad_(wants) if isinstance(a, torch.Tensor) else a
                for a, wants in zip(self.back, wants_grad)]
        self.host = self.back = None
        return args


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a CUDA tensor into pinned memory, on a side stream (the tensor itself as it is on the CPU)."""
    if tensor.device.type != "cuda":
        return tensor.detach()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream = _side_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written before it is copied
    with torch.cuda.stream(stream):
        host.copy_(tensor.detach(), non_blocking=True)
    tensor.record_stream(stream)  # its memory is not reused before the copy is done
    return host


def _record(device: torch.device) -> torch.cuda.Event | None:
    """An event at the side stream's current end (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(_side_stream(device))
    return event


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _autocast_state(device_type: str) -> dict:
    return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


def _cuda_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
