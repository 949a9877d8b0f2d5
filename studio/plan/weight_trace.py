"""Which frozen weights autograd saves for backward, from the meta-device trace.

The activation trace (studio/plan/trace.py) leaves weights out: they are on the card anyway. Not so when the card
stores them in fp8 (diffusers' layerwise casting): each layer's weights are cast to 16-bit for its forward, and a
matmul whose input requires grad saves that 16-bit copy for its backward. A layer fed only by frozen inputs (Flux's
modulation linears, fed by the timestep embedding) saves none, so the copies are counted where autograd takes them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch

from studio.plan import probes
from studio.plan.probes import Shape


@lru_cache(maxsize=32)
def saved_weight_bytes(shape: Shape, length: int) -> tuple[int, int]:
    """(bytes of the frozen weights saved over the whole pass, the most saved inside one checkpointed unit), at the
    16-bit dtype the model is traced in."""
    built = probes.build(shape)
    frozen = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in built.model.parameters()
              if not p.requires_grad}
    everywhere: set[int] = set()
    units: list[int] = []

    def recording(into: set[int]):
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = tensor.untyped_storage()._cdata
            if key in frozen:
                into.add(key)
            return tensor
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def unit_checkpoint(unit: Callable, *args: Any, **kwargs: Any) -> Any:
        inside: set[int] = set()
        with recording(inside):  # the innermost hooks see the unit's saves: count them into both
            out = unit(*args, **kwargs)
        units.append(sum(frozen[key] for key in inside))
        everywhere.update(inside)
        return out

    built.checkpointing(built.model, unit_checkpoint)
    with recording(everywhere):
        built.run(length)
    return sum(frozen[key] for key in everywhere), max(units, default=0)
