"""GroupNorm and LayerNorm in the compute dtype under autocast (issue 24).

CUDA autocast runs `group_norm` and `layer_norm` in fp32: a norm casts its 16-bit input up, writes an fp32 output,
and every matmul or convolution reading that output casts it down again (an attention's to_q, to_k and to_v each
cast the same tensor), forward and backward. On an SD1.5 UNet that is ~140 cast kernels each way per sample batch,
the largest share of the `aten::copy_` an H200 profile counted (628 `ToCopyBackward0` per update), and each fp32
copy is saved for backward. The norms' CUDA kernels accumulate their statistics in fp32 whatever the tensor dtype,
so a 16-bit norm differs from autocast's only in where its output is rounded: at the norm, not at each reader (a
SiLU between them then runs on the rounded value). Pure-16-bit trainers (ai-toolkit, SimpleTuner, kohya's
full_bf16) run every norm this way.

`norms_in_compute_dtype` swaps the class of the GroupNorm / LayerNorm layers whose weights are in the compute
dtype (or that have none); parameters and state dicts stay as they are. Layers kept in fp32 (a model's
`_keep_in_fp32_modules`, an fp32 run) keep autocast's rule. The memory plan traces autocast's rules without the norms
(studio/plan/autocast_trace.py), so plan and run count the same tensors.
"""

from __future__ import annotations

import torch

NORM_FUNCTIONS = (torch.nn.functional.group_norm, torch.nn.functional.layer_norm)  # what the classes below call


class _InComputeDtype:
    """The norm's forward with autocast off, on its input in autocast's dtype (a no-op cast when it already is)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if device not in ("cuda", "cpu", "xpu") or not torch.is_autocast_enabled(device):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            return super().forward(x.to(torch.get_autocast_dtype(device)))


class GroupNormInComputeDtype(_InComputeDtype, torch.nn.GroupNorm):
    pass


class LayerNormInComputeDtype(_InComputeDtype, torch.nn.LayerNorm):
    pass


SWAPS = {torch.nn.GroupNorm: GroupNormInComputeDtype, torch.nn.LayerNorm: LayerNormInComputeDtype}


def norms_in_compute_dtype(modules: list[torch.nn.Module], dtype: torch.dtype) -> int:
    """Run the GroupNorm / LayerNorm layers under `modules` whose weights are in `dtype` in it under autocast;
    returns how many."""
    layers = [layer for module in modules for layer in module.modules()
              if type(layer) in SWAPS and all(p.dtype == dtype for p in layer.parameters(recurse=False))]
    for layer in layers:
        layer.__class__ = SWAPS[type(layer)]
    return len(layers)
