"""Norms in the compute dtype under autocast (issue 24).

CUDA autocast runs `group_norm` and `layer_norm` in fp32: a norm casts its 16-bit input up, writes an fp32 output,
and every matmul or convolution reading that output casts it down again (an attention's to_q, to_k and to_v each
cast the same tensor), forward and backward. On an SD1.5 UNet that is ~140 cast kernels each way per sample batch,
the largest share of the `aten::copy_` an H200 profile counted (628 `ToCopyBackward0` per update), and each fp32
copy is saved for backward. The norms' CUDA kernels accumulate their statistics in fp32 whatever the tensor dtype,
so a 16-bit norm differs from autocast's only in where its output is rounded: at the norm, not at each reader (a
SiLU between them then runs on the rounded value). Pure-16-bit trainers (ai-toolkit, SimpleTuner, kohya's
full_bf16) run every norm this way.

diffusers' RMSNorm upcasts by hand (`hidden_states.to(torch.float32)`, then pow, mean, rsqrt, two multiplies and a
cast back: Flux.1's q/k norms are ~450 of its proxy's 1,401 dispatched copies per update); its swapped class calls
`F.rms_norm`, which CUDA runs as one fused kernel with fp32 statistics.

`norms_in_compute_dtype` swaps the class of the GroupNorm / LayerNorm / RMSNorm layers whose weights are in the
compute dtype (or that have none); parameters and state dicts stay as they are. Layers kept in fp32 (a model's
`_keep_in_fp32_modules`, an fp32 run) keep autocast's rule. The planner's probes swap the same layers; its trace keeps
what the fused kernels keep (studio/plan/trace.py) under autocast's rules without the norms
(studio/plan/autocast_trace.py), so plan and run count the same tensors.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

NORM_FUNCTIONS = (F.group_norm, F.layer_norm)  # what autocast runs in fp32 (diffusers' RMSNorm: F.rms_norm below)
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")


class _InComputeDtype:
    """The norm's forward with autocast off, on its input in autocast's dtype (a no-op cast when it already is)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if device not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
            return self._normalize(x)
        with torch.autocast(device, enabled=False):
            return self._normalize(x.to(torch.get_autocast_dtype(device)))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class GroupNormInComputeDtype(_InComputeDtype, torch.nn.GroupNorm):
    pass


class LayerNormInComputeDtype(_InComputeDtype, torch.nn.LayerNorm):
    pass


@lru_cache(maxsize=1)
def _swaps() -> dict[type, type]:
    from diffusers.models.normalization import RMSNorm

    class RMSNormInComputeDtype(_InComputeDtype, RMSNorm):
        """diffusers' RMSNorm (Flux, Chroma, Z-Image, Qwen-Image, FLUX.2 q/k norms) as PyTorch's `F.rms_norm`: on
        CUDA one fused kernel each way (`_fused_rms_norm`, fp32 statistics) where diffusers' forward runs ~8
        kernels forward and ~12 backward around an fp32 copy of its input, which it also keeps for backward."""

        def _normalize(self, x: torch.Tensor) -> torch.Tensor:
            out = F.rms_norm(x, self.dim, self.weight, self.eps)
            return out if self.bias is None else out + self.bias

    return {torch.nn.GroupNorm: GroupNormInComputeDtype, torch.nn.LayerNorm: LayerNormInComputeDtype,
            RMSNorm: RMSNormInComputeDtype}


def norms_in_compute_dtype(modules: list[torch.nn.Module], dtype: torch.dtype) -> int:
    """Run the GroupNorm / LayerNorm / diffusers RMSNorm layers under `modules` whose weights are in `dtype` in it
    under autocast; returns how many."""
    swaps = _swaps()
    layers = [layer for module in modules for layer in module.modules()
              if type(layer) in swaps and all(p.dtype == dtype for p in layer.parameters(recurse=False))
              and len(getattr(layer, "dim", (0,))) == 1]  # diffusers' RMSNorm normalizes the last dim only
    for layer in layers:
        layer.__class__ = swaps[type(layer)]
    return len(layers)
