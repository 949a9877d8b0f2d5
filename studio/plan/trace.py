"""What a model keeps for backward, measured by running it on PyTorch's meta device (shapes only: no weights, no
compute, a full-size SDXL UNet in about a second).

Autograd's saved-tensor hooks see every tensor a forward pass keeps for its backward; summing their storages gives
the activation memory of one micro-batch. The model's own gradient-checkpointing switch is turned on with a
recording function in place of `torch.utils.checkpoint`, so one pass also tells what checkpointing would keep (each
unit's inputs, plus the largest unit while it is recomputed). Attention is counted as CUDA's fused kernels keep it
(q, k, v, output and log-sum-exp, never the N×N matrix), which is what SDPA runs on the cards we plan for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Trace:
    """Bytes saved for backward by one micro-batch of one sample."""
    outside: int = 0  # saved outside the checkpointable units (embeddings, norms, the loss)
    unit_inputs: int = 0  # the units' inputs: all that checkpointing keeps of them
    unit_saved: list[int] = field(default_factory=list)  # saved inside each unit when it is not checkpointed

    def activations(self, checkpointing: bool) -> int:
        if checkpointing:
            return self.outside + self.unit_inputs + max(self.unit_saved, default=0)
        return self.outside + sum(self.unit_saved)

    def backward_peak(self) -> int:
        """Gradients of one unit's activations, alive while backward passes through it."""
        return max(self.unit_saved, default=self.outside)


class _Counter:
    """Sums the distinct storages handed to autograd's saved-tensor hooks, skipping the weights' storages."""

    def __init__(self, params: set[int]):
        self.params = params
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage itself: views of one tensor (and of a weight) count once
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for flash / memory-efficient SDPA: keeps what those kernels keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedRMSNorm(torch.autograd.Function):
    """Shape-only stand-in for CUDA's fused `F.rms_norm` (`_fused_rms_norm`): keeps the input and the fp32
    reciprocal RMS per row, where its CPU / meta composite keeps an fp32 copy of the input as well."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, x.new_empty(*x.shape[:-1], 1, dtype=torch.float32))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, _ = ctx.saved_tensors
        return torch.empty_like(x), None


class _AsFusedKernels(TorchFunctionMode):
    """Routes `scaled_dot_product_attention` to `_FusedAttention` and `rms_norm` to `_FusedRMSNorm`, and counts
    attention's FLOPs (the FLOP counter cannot see inside a custom Function): 4·N·M·D forward, 2.5× that backward,
    as flash attention does."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.rms_norm:
            return _FusedRMSNorm.apply(args[0], args[2] if len(args) > 2 else kwargs.get("weight"))
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (*args, *(kwargs[name] for name in ("query", "key", "value")[len(args):]))[:3]
            n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
            batch_heads = q.numel() // (n * d)
            self.flops += int(4 * batch_heads * n * m * d * (3.5 if q.requires_grad else 1))
            if k.shape[-3] != q.shape[-3]:  # grouped-query attention: repeat k/v heads as the kernel would
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
                v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
            return _FusedAttention.apply(q, k, v)
        return func(*args, **kwargs)


Runner = Callable[[], torch.Tensor]  # runs the forward and returns the loss


def trace_saved(model: torch.nn.Module, run: Runner,
                enable_checkpointing: Callable[[torch.nn.Module, Callable], None]) -> Trace:
    """Run `run()` (a forward pass of `model` on meta tensors, returning its loss) and measure what it saves.

    `enable_checkpointing(model, func)` turns on the model's checkpointing with `func(unit, *args)` in place of
    torch's checkpoint function (diffusers and transformers both call it that way).
    """
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    result = Trace()
    outer = _Counter(params)

    def recording_checkpoint(unit: Callable, *args: Any, **kwargs: Any) -> Any:
        for arg in args:  # checkpointing keeps the unit's inputs for the recompute
            if isinstance(arg, torch.Tensor) and arg.requires_grad:
                result.unit_inputs += arg.untyped_storage().nbytes()
        inner = _Counter(params)
        with inner.hooks():
            out = unit(*args, **kwargs)
        result.unit_saved.append(inner.bytes)
        return out

    enable_checkpointing(model, recording_checkpoint)
    with outer.hooks(), _AsFusedKernels():
        run()
    result.outside = outer.bytes
    return result


def count_flops(run: Runner) -> int:
    """FLOPs of one forward + backward of `run()` (meta tensors), attention included."""
    attention = _AsFusedKernels()
    with FlopCounterMode(display=False) as counter, attention:
        run().backward()
    return int(counter.get_total_flops()) + attention.flops
