"""peft's LoRA Linear layer as one autograd node, its frozen base layer included (issue 24).

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the base linear, two `F.linear` (each a transpose,
views and an mm, forward and backward), a multiply by a Python float (on the CPU a scalar cast each way), an add,
and an AccumulateGrad per weight; autocast casts the input once for the base and peft once more for the LoRA path.
`_LoraLinear` does what unsloth's fast_lora does: the base's addmm, the LoRA product added into its output in place
(the scale as addmm's alpha), and backward the base's and the LoRA path's input gradients summed in one addmm; the
weights' gradients go straight into their `.grad` when that is a slice of studio/master_weights.py's flat gradient
buffer, so no gather per weight. Where the base layer's forward is not a plain linear (fp8 storage hooks, LoRA
dropout between the two inputs), `_LoraBranch` adds the LoRA path into the output of the base layer's own forward.
The sums are the same: in fp32 at alpha = rank (the default) the output bit for bit, the gradients to fp32 rounding
(a layer's input gradient is base + LoRA before autograd adds its other readers'); in bf16 base + LoRA is rounded
once, not three times (within bf16 rounding of peft's, tests/test_fused_lora.py).

`fuse_lora_linears` swaps the class of plain LoRA Linear layers (nn.Linear base, weights not transposed) to
`FusedLoraLinear`: the parameters, their names and the adapter's state dict stay as they are. Each call takes a
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
        grad_hidden, grad_a, grad_b = _lora_backward(_rows(grad), rows, a, b, hidden, ctx.scale)
        grad_x = torch.mm(grad_hidden, a).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return grad, grad_x, grad_a, grad_b, None


class _LoraLinear(torch.autograd.Function):
    """x Wᵀ + bias + scale · (x Aᵀ) Bᵀ, the frozen base weight W: (out, in) included: one addmm (an mm without a
    bias) into which the LoRA product goes in place; backward the input gradient is grad·W with the LoRA path's
    added in one addmm (autograd would add two products). W is saved detached, as nn.Linear saves it, so a block
    swap that moves the weight's storage later leaves this backward the storage its forward used."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        rows = _rows(x)
        out = (torch.addmm(bias, rows, weight.transpose(0, 1)) if bias is not None
               else torch.mm(rows, weight.transpose(0, 1)))
        hidden = torch.mm(rows, a.transpose(0, 1))
        out.addmm_(hidden, b.transpose(0, 1), alpha=scale)
        ctx.save_for_backward(rows, weight.detach(), a, b, hidden)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, weight, a, b, hidden = ctx.saved_tensors
        grad_rows = _rows(grad)
        grad_hidden, grad_a, grad_b = _lora_backward(grad_rows, rows, a, b, hidden, ctx.scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_rows, weight).addmm_(grad_hidden, a).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None


def _lora_backward(grad_out, rows, a, b, hidden, scale):
    """The LoRA path's backward from the output gradient (rows, out): the gradient of the rank-wide hidden product,
    and of A and B (None where written into the flat buffer); the scale is peft's `* scaling`, in the same dtype."""
    if scale != 1:
        grad_out = grad_out * scale
    grad_hidden = torch.mm(grad_out, b)
    return grad_hidden, _weight_grad(a, grad_hidden, rows), _weight_grad(b, grad_out, hidden)


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
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        base, dropout = self.base_layer, self.lora_dropout[adapter]
        if isinstance(dropout, torch.nn.Identity) and _plain_base(base, x, a.dtype) and b.dtype == a.dtype:
            return _LoraLinear.apply(x.to(a.dtype), base.weight, base.bias, a, b, self.scaling[adapter])
        result = base(x)
        x = dropout(self._cast_input_dtype(x, a.dtype))
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


def _plain_base(base: torch.nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """The base layer computes F.linear(x, weight, bias) in `dtype`: frozen, nothing hooked into its forward (fp8
    storage casts in a hook that replaces `forward`), its tensors in `dtype`, and autocast (if on) computing in it."""
    device = x.device.type
    return (not base.weight.requires_grad and base.weight.dtype == dtype
            and (base.bias is None or (base.bias.dtype == dtype and not base.bias.requires_grad))
            and "forward" not in base.__dict__ and not (base._forward_hooks or base._forward_pre_hooks)
            and (not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == dtype))


def fuse_lora_linears(modules: list[torch.nn.Module]) -> int:
    """Give the plain LoRA Linear layers under `modules` the fused forward; returns how many."""
    layers = [layer for module in modules for layer in module.modules()
              if type(layer) is LoraLinear and type(layer.base_layer) is torch.nn.Linear
              and not layer.fan_in_fan_out]
    for layer in layers:
        layer.__class__ = FusedLoraLinear
    return len(layers)
