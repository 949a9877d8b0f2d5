"""Trainable weights in the compute dtype, with fp32 master copies for the optimizer.

Under bf16/fp16 autocast, fp32 LoRA weights (diffusers' `cast_training_params`, peft's default) cost casts on every
call: each LoRA matmul casts its weights, peft casts the layer's input to lora_A's dtype (fp32) and autocast casts it
back, and the backward casts every gradient to fp32 again. On an SD1.5 update that is ~1,800 copy kernels, most of
the launches a launch-bound GPU waits for (issue 24). What large-scale trainers do instead (Megatron-LM's
distributed optimizer, DeepSpeed's bf16 optimizer, apex O2) is what `MasterWeights` does:

- the trainable parameters are views into one flat buffer in the compute dtype, so forward and backward run in it
  with no per-call cast;
- their gradients land in one flat buffer in the compute dtype: each parameter's `.grad` is its slice, so autograd
  adds into it in place (and studio/fused_lora.py's LoRA layers write into it directly); after each micro-batch's
  backward the whole buffer goes into one flat fp32 buffer (one copy, from the second micro-batch on one add):
  accumulation over micro-batches stays fp32;
- the optimizer, loss scaling, clipping and the all-reduce work on the flat fp32 master: one tensor per parameter
  group (a slice of one buffer), so a step is a few kernels, not a few per LoRA weight (`load_optimizer_state`
  reads the per-weight state older checkpoints hold);
- after the step, one copy rounds the whole master buffer into the compute buffer.

bf16-only weights with stochastic rounding (kohya's full_bf16) would save the master's 4 bytes per parameter, but
LoRA weights are few, and an update below bf16's resolution (lr 1e-4 on weights of ~1e-2) would be lost or noisy;
the master keeps the fp32 trajectory, so loss curves match the fp32-weight path within bf16 noise. Checkpoints and
exports read the master: `full_precision()` puts the fp32 values in the parameters for that moment.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch

from studio.errors import StudioError


class SameWeights:
    """Full fp32 training (no autocast), or a sharded model: the optimizer steps the parameters themselves."""

    def __init__(self, groups: list[dict]):
        self.groups = groups
        self.grad_owners = [p for group in groups for p in group["params"]]  # what clipping / the all-reduce see

    def collect(self) -> None:
        """After a micro-batch's backward."""

    def attach_grads(self) -> None:
        """After the all-reduce, before unscaling / clipping / the step."""

    def publish(self) -> None:
        """After the optimizer step."""

    def discard(self) -> None:
        """After an update ran out of memory: its gradients are dropped (the optimizer's zero_grad does it here)."""

    def full_precision(self) -> ContextManager[None]:
        """Around reading or writing the adapter's weights (checkpoints, exports, resume)."""
        return nullcontext()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        try:
            optimizer.load_state_dict(state)
        except ValueError as exc:  # a layout of one flat master per group: saved by a bf16 / fp16 run
            raise StudioError("resume_from: the checkpoint's optimizer state was saved with another "
                              "mixed_precision setting; resume with the setting it was saved with.") from exc


class MasterWeights(SameWeights):
    """Parameters in `dtype` (views into one flat buffer), fp32 master tensors in `groups` for the optimizer."""

    def __init__(self, groups: list[dict], dtype: torch.dtype):
        self.params = [p for group in groups for p in group["params"]]
        sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            self.master = torch.cat([_in_memory_order(p.detach()).float() for p in self.params])
            self.compute = self.master.to(dtype)
        self.grad = torch.zeros_like(self.master)
        self.compute_grad = torch.zeros_like(self.compute)  # one micro-batch's gradients, each parameter's .grad
        self.grad_owners = [self.master]  # clipping and the all-reduce see one tensor (its .grad), not hundreds
        self._masters = _views(self.master, self.params, sizes)
        self._computes = _views(self.compute, self.params, sizes)
        self._compute_grads = _views(self.compute_grad, self.params, sizes)
        for param, view in zip(self.params, self._computes):
            param.data = view
        self._point_grads()
        group_sizes = [sum(p.numel() for p in group["params"]) for group in groups]
        self._group_masters = list(self.master.split(group_sizes))
        self._group_grads = list(self.grad.split(group_sizes))
        self.groups = [{**group, "params": [master]} for group, master in zip(groups, self._group_masters)]
        self._per_group = [len(group["params"]) for group in groups]
        self._accumulated = False

    def collect(self) -> None:
        with torch.no_grad():
            for param, view in zip(self.params, self._compute_grads):
                if param.grad is not view and param.grad is not None:  # replaced by someone: added, not lost
                    view.add_(param.grad)
            if self._accumulated:
                self.grad.add_(self.compute_grad)
            else:
                self.grad.copy_(self.compute_grad)  # cast to fp32 in the same kernel
            self.compute_grad.zero_()
        self._point_grads()
        self._accumulated = True
        self.master.grad = self.grad

    def _point_grads(self) -> None:
        for param, view in zip(self.params, self._compute_grads):
            param.grad = view

    def attach_grads(self) -> None:
        summed = self.master.grad
        if summed is None:  # no micro-batch in this process (an empty share of the group): zeros, as summed
            self.grad.zero_()
        elif summed is not self.grad:  # the all-reduce handed back a new tensor
            self.grad.copy_(summed)
        self.master.grad = self.grad
        for master, grad in zip(self._group_masters, self._group_grads):
            master.grad = grad
        self._accumulated = False

    def publish(self) -> None:
        with torch.no_grad():
            self.compute.copy_(self.master)
        self.master.grad = None  # the next update's all-reduce must not see this one's gradient

    def discard(self) -> None:
        self._accumulated = False
        self.master.grad = None
        self.compute_grad.zero_()
        self._point_grads()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Also from a checkpoint with one state per LoRA weight (an fp32 run, or one from before master weights):
        its state tensors are concatenated into the flat ones."""
        if [len(group["params"]) for group in state["param_groups"]] != [1] * len(self.groups):
            state = _flattened(state, self._per_group)
        optimizer.load_state_dict(state)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        for param, master in zip(self.params, self._masters):
            param.grad = None  # a .grad keeps its parameter's dtype
            param.data = master
        try:
            yield
        finally:
            for param, compute in zip(self.params, self._computes):
                param.data = compute
            self._point_grads()
            self.publish()  # the master may have been loaded (resume)


def _flattened(state: dict, per_group: list[int]) -> dict:
    """An optimizer state_dict with one entry per weight turned into one entry per group (`per_group` weights each,
    in order): tensors concatenated, scalars (Adam's step) taken from the group's first weight."""
    if [len(group["params"]) for group in state["param_groups"]] != per_group:
        raise StudioError("resume_from: the checkpoint's optimizer state does not fit this run's LoRA weights; "
                          "resume with the settings it was saved with.")
    flat, start = {}, 0
    for index, count in enumerate(per_group):
        entries = [state["state"][i] for i in range(start, start + count) if i in state["state"]]
        start += count
        if entries:
            flat[index] = {key: torch.cat([e[key].reshape(-1).float() for e in entries]) if value.dim() else value
                           for key, value in entries[0].items()}
    groups = [{**group, "params": [index]} for index, group in enumerate(state["param_groups"])]
    return {"state": flat, "param_groups": groups}


def _in_memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as they lie in memory (so channels_last conv weights keep their layout)."""
    return tensor.as_strided((tensor.numel(),), (1,))


def _views(flat: torch.Tensor, params: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """Each parameter's slice of `flat`, with the parameter's shape and strides."""
    return [chunk.as_strided(p.size(), p.stride()) for chunk, p in zip(flat.split(sizes), params)]


def trainable_weights(groups: list[dict], autocast: torch.dtype | None, sharded: bool) -> SameWeights:
    """Master weights under autocast; the parameters as they are in fp32 or when FSDP owns the model's storage."""
    if autocast is None or sharded or not groups:
        return SameWeights(groups)
    return MasterWeights(groups, autocast)
