"""peft's LoRA Linear layer with its LoRA branch as one autograd node (issue 24).

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: two `F.linear` (each a transpose, views and an mm,
forward and backward), a multiply by a Python float (on the CPU a scalar cast each way), an add, and an
AccumulateGrad per weight. `_LoraBranch` does the same arithmetic as one mm and one in-place addmm forward (the
scale as addmm's alpha), four products backward, the weights' gradients written straight into their `.grad` when
that is a slice of studio/master_weights.py's flat gradient buffer, so no gather per weight. The sums
are the same: bit for bit in fp32 at alpha = rank (the default); in bf16 base + LoRA is rounded once, not three
times (within bf16 rounding of peft's, tests/test_fused_lora.py).

`fuse_lora_linears` swaps the class of plain LoRA Linear layers (nn.Linear base, weights not transposed) to
`FusedLoraLinear`: the parameters, their names and the adapter's state dict stay as they are. Each call takes the
fused path only where it computes what peft's does: one active vanilla LoRA adapter (no DoRA or other variant, no
LoRA bias), not merged, adapters enabled, no extra arguments, and the base output, the input and both weights in one
dtype; anything else is peft's own forward. The dropout and the input cast are peft's, applied as peft applies them.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class _LoraBranch(torch.autograd.Function):
    """base_out + scale · (x Aᵀ) Bᵀ, with A: (rank, in) and B: (out, rank). In place into base_out (a linear layer
    does not keep its output for the backward; an addmm into a new tensor first copies base_out into it), unless
    base_out is a view (nn.Linear's output with a bias), whose in-place change autograd would pay for with copies."""

    @staticmethod
    def forward(ctx, base_out, x, a, b, scale):
        rows = _rows(x)
        hidden = torch.mm(rows, a.transpose(0, 1))  # transpose(): one dispatch fewer than t()
        ctx.save_for_backward(rows, a, b, hidden)
        ctx.scale, ctx.x_shape = scale, x.shape
        flat = base_out.view(-1, base_out.shape[-1])
        if base_out._is_view():
            return torch.addmm(flat, hidden, b.transpose(0, 1), alpha=scale).view(base_out.shape)
        flat.addmm_(hidden, b.transpose(0, 1), alpha=scale)
        ctx.mark_dirty(base_out)
        return base_out

    @staticmethod
    def backward(ctx, grad):
        rows, a, b, hidden = ctx.saved_tensors
        grad_out = _rows(grad)
        if ctx.scale != 1:
            grad_out = grad_out * ctx.scale  # the gradient of peft's `* scaling`, in the same dtype
        grad_hidden = torch.mm(grad_out, b)
        grad_x = torch.mm(grad_hidden, a).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return grad, grad_x, _weight_grad(a, grad_hidden, rows), _weight_grad(b, grad_out, hidden), None


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as (rows, features); a view where the layout allows (reshape would call view: one dispatch more)."""
    features = tensor.shape[-1]
    return tensor.view(-1, features) if tensor.is_contiguous() else tensor.reshape(-1, features)


def _weight_grad(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor | None:
    """leftᵀ · right, written straight into `weight.grad` when that is a slice of the flat buffer of
    studio/master_weights.py (zeroed before each micro-batch: an addmm into zeros sums exactly as an mm does), else
    returned for autograd to add (a .grad holding earlier micro-batches gets the rounded product added, as before)."""
    grad = weight.grad
    if grad is None or not grad._is_view():
        return torch.mm(left.transpose(0, 1), right)
    grad.addmm_(left.transpose(0, 1), right)
    return None


class FusedLoraLinear(LoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else self._fusable_adapter()
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        x = self.lora_dropout[adapter](self._cast_input_dtype(x, a.dtype))
        if not (result.dtype == x.dtype == a.dtype == b.dtype and result.is_contiguous()):
            # e.g. fp32 LoRA weights under autocast: peft's sum
            return (result + self.lora_B[adapter](self.lora_A[adapter](x)) * self.scaling[adapter]).to(result.dtype)
        return _LoraBranch.apply(result, x, a, b, self.scaling[adapter])

    def _fusable_adapter(self) -> str | None:
        """The one active plain LoRA adapter, when the fused path computes exactly what peft's forward would."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        plain = adapter in self.lora_A and adapter not in self.lora_variant and self.lora_B[adapter].bias is None
        return adapter if plain else None


def fuse_lora_linears(modules: list[torch.nn.Module]) -> int:
    """Give the plain LoRA Linear layers under `modules` the fused forward; returns how many."""
    layers = [layer for module in modules for layer in module.modules()
              if type(layer) is LoraLinear and type(layer.base_layer) is torch.nn.Linear
              and not layer.fan_in_fan_out]
    for layer in layers:
        layer.__class__ = FusedLoraLinear
    return len(layers)
