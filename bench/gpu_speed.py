"""The speed arithmetic of the GPU bench: seconds per update after the warm-up, the device's peak, MFU."""

from __future__ import annotations

DEFAULT_STEPS, WARMUP = 30, 5
# Dense bf16 tensor-core peaks (FLOP/s), matched in order against the device name; sparsity figures are not used.
PEAK_BF16_DENSE = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s from its name, or None for a device not in the table."""
    name = device_name.upper()
    return next((flops for key, flops in PEAK_BF16_DENSE if key.upper() in name), None)


def mfu(flops_per_sample: float | None, samples_per_step: float | None, seconds_per_step: float | None,
        peak: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOPs an update needs over what the device could do in that time."""
    if not flops_per_sample or not samples_per_step or not seconds_per_step or not peak or seconds_per_step <= 0:
        return None
    return flops_per_sample * samples_per_step / seconds_per_step / peak


def warmup_for(steps: int) -> int:
    """Updates left out of the timing: the first few pay for allocation and kernel selection."""
    return max(1, min(WARMUP, steps // 3))


def seconds_per_step(times: list[float], warmup: int) -> float | None:
    """Mean seconds per update from the timestamps at the end of each update, after the first `warmup`."""
    if warmup < 1 or len(times) <= warmup:
        return None
    return (times[-1] - times[warmup - 1]) / (len(times) - warmup)
