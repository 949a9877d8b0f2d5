"""The device the GPU bench measures on: CUDA with cards emulated by capping torch's allocator, or the CPU in a
dry run (no caps, no memory statistics)."""

from __future__ import annotations

import gc

from gpu_log import error_text, say
from studio.plan.memory import CUDA_CONTEXT_GB

GB = 2**30


class Cuda:
    """The CUDA calls the bench makes (memory caps and statistics); DryCpu stands in for them in a dry run."""
    dry = False
    device = "cuda"

    def __init__(self):
        import torch
        self.torch = torch

    def name(self) -> str:
        return self.torch.cuda.get_device_name(0)

    def total_gb(self) -> float:
        return self.torch.cuda.get_device_properties(0).total_memory / GB

    def free(self) -> None:
        gc.collect()
        try:  # after a CUDA error these raise again; the case that hit it has recorded it already
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            say(f"   (freeing GPU memory failed: {error_text(exc)})")

    def set_card(self, card_gb: float | None) -> None:
        """Cap torch's allocator at what a `card_gb` card leaves after the CUDA context (None: no cap)."""
        self.free()
        fraction = 1.0 if card_gb is None else (card_gb - CUDA_CONTEXT_GB) / self.total_gb()
        self.torch.cuda.set_per_process_memory_fraction(min(1.0, max(fraction, 0.01)), 0)

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def peak_allocated_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / GB

    def peak_reserved_gb(self) -> float | None:
        return self.torch.cuda.max_memory_reserved() / GB

    def allocated_gb(self) -> float | None:
        return self.torch.cuda.memory_allocated() / GB


class DryCpu(Cuda):
    """Cuda's calls for a dry run on the CPU: no card caps and no memory statistics (None)."""
    dry = True
    device = "cpu"

    def name(self) -> str:
        return "CPU (dry run)"

    def total_gb(self) -> float:
        return 1e6  # no card is too big for the dry run

    def free(self) -> None:
        gc.collect()

    def set_card(self, card_gb: float | None) -> None:
        self.free()

    def reset_peak(self) -> None:
        pass

    def peak_allocated_gb(self) -> None:
        return None

    def peak_reserved_gb(self) -> None:
        return None

    def allocated_gb(self) -> None:
        return None

