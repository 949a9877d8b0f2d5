"""The meta-device trace again, under autocast's cast rules (the meta device has no autocast of its own).

On the card the engines train under `torch.autocast`: matmuls and convolutions run in 16-bit, while softmax and
losses run in fp32 (norms would too, but the engines run them in the compute dtype: studio/compute_dtype_norms.py).
Their inputs are cast first, and a cast that autograd needs is saved: under autocast's rule for norms a GroupNorm's
fp32 copy of its input and its fp32 output (which SiLU saves), a 16-bit copy of that output for each convolution or
LoRA layer reading it; the fp32 copy of a prediction for the loss. A plain trace of the 16-bit model sees none of
these copies. This mode applies CUDA autocast's op lists (torch.amp's "float16/bfloat16" and "float32" ops that
matter for memory) so the same trace counts them.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from studio.compute_dtype_norms import NORM_FUNCTIONS
from studio.plan import probes
from studio.plan.probes import Shape
from studio.plan.trace import Trace, trace_saved

LOW_PRECISION_OPS = {F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                     F.conv_transpose3d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                     torch.bmm, torch.baddbmm, torch.addmm, torch.einsum, F.scaled_dot_product_attention}
FP32_OPS = {F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
            torch.log_softmax, torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, F.mse_loss, torch.exp,
            torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt}
# The trained models' norms run in the compute dtype (studio/compute_dtype_norms.py); runs measured before that ran
# them under autocast's fp32 rule, which `fp32_norms` traces.
FP32_NORMS = frozenset(NORM_FUNCTIONS)


class AutocastRules(TorchFunctionMode):
    """Casts the floating-point inputs of autocast's ops as CUDA autocast does (to `low` or to fp32)."""

    def __init__(self, low: torch.dtype, fp32_norms: bool = False):
        super().__init__()
        self.low = low
        self.fp32 = FP32_OPS | FP32_NORMS if fp32_norms else FP32_OPS

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = self.low if func in LOW_PRECISION_OPS else torch.float32 if func in self.fp32 else None
        if to is not None:
            def cast(value):
                floating = isinstance(value, torch.Tensor) and value.is_floating_point()
                return value.to(to) if floating and value.dtype != to else value
            args = tuple(cast(a) for a in args)
            kwargs = {key: cast(value) for key, value in kwargs.items()}
        return func(*args, **kwargs)


@lru_cache(maxsize=128)
def trace_autocast(shape: Shape, length: int, fp32_norms: bool = False) -> Trace:
    """What one sample saves for backward under autocast to `shape.dtype` (the mode sits inside the trace's own,
    so attention reaches the fused-attention stand-in already cast); `fp32_norms`: with autocast's rule for norms."""
    built = probes.build(shape)

    def run() -> torch.Tensor:
        with AutocastRules(shape.dtype, fp32_norms):
            return built.run(length)

    return trace_saved(built.model, run, built.checkpointing)
