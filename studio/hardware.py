"""What machine we train on, and what a run should look like on it.

The only place that picks a torch device and dtype. What a run should look like on a card is the memory plan's job
(studio/plan/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.errors import StudioError


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda", "mps" or "cpu"
    name: str
    total_gb: float | None  # accelerator memory; None on CPU
    free_gb: float | None
    bf16: bool

    def summary(self) -> str:
        if self.total_gb is None:
            return f"{self.name} (no GPU: training runs on the CPU, fine for the demo, slow for real models)"
        free = f", {self.free_gb:.1f} GB free" if self.free_gb is not None else ""
        return f"{self.name}: {self.total_gb:.1f} GB{free}, bf16 {'yes' if self.bf16 else 'no'}"


def detect() -> Hardware:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return Hardware("cuda", torch.cuda.get_device_name(0), total / 2**30, free / 2**30,
                        torch.cuda.is_bf16_supported())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        # Apple GPUs share system memory: no card size to plan for (vram_budget_gb can give one).
        return Hardware("mps", "Apple MPS", None, None, False)
    return Hardware("cpu", "CPU", None, None, True)


def pick_device(preference: str = "auto") -> torch.device:
    """The device a run uses: the config's choice, checked, or the best available one."""
    available = detect().device
    if preference == "auto":
        return torch.device(available)
    if preference == "cuda" and not torch.cuda.is_available():
        raise StudioError("device is 'cuda' but no CUDA GPU is visible to PyTorch. Set device: auto or cpu, "
                          "or install the CUDA build of torch.")
    if preference == "mps" and available != "mps":
        raise StudioError("device is 'mps' but Apple MPS is not available here. Set device: auto or cpu.")
    return torch.device(preference)


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def storage_dtype(autocast: torch.dtype | None, device_type: str) -> torch.dtype:
    """The dtype frozen base weights are stored in: the autocast dtype on GPUs and under CPU autocast (half the
    memory, and no cast of every weight on every call), else fp32. LoRA weights train in it too, with fp32 masters
    (studio/master_weights.py). The engines load with it; the memory plan counts with it."""
    return autocast if autocast is not None and device_type in ("cuda", "cpu") else torch.float32


def auto_precision(device_type: str, bf16: bool) -> tuple[str, str]:
    """What `mixed_precision: auto` means on a device: (setting, one-line reason)."""
    if device_type != "cuda":
        return "no", f"fp32: autocast on {device_type} gains little and risks accuracy"
    if bf16:
        return "bf16", "bf16: this GPU supports it (no loss scaling needed)"
    return "fp16", "fp16 with loss scaling: this GPU has no bf16"


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for full fp32."""
    if mixed_precision == "auto":
        mixed_precision = auto_precision(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())[0]
    if mixed_precision == "no":
        return None
    if device.type == "cpu" and mixed_precision == "fp16":
        raise StudioError("mixed_precision fp16 is not supported on the CPU. Use bf16 or no.")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise StudioError("mixed_precision bf16 needs an Ampere (RTX 30xx) or newer GPU. Use fp16 on this card.")
    return HALF_DTYPES[mixed_precision]


def inference_dtype(device: torch.device) -> torch.dtype:
    """Weights dtype for previews: half precision on GPUs (bf16 where the card has it), fp32 elsewhere."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --- fast paths on CUDA (the CPU has none to switch on) -------------------------------------------------------------

def is_ampere_or_newer(device: torch.device) -> bool:
    """CUDA compute capability 8+: TF32 tensor cores and PyTorch's flash attention kernels."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def configure_backends(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on Ampere+: ~8x the fp32 rate for a 10-bit mantissa per product, the
    trade every trainer makes there (fp16/bf16 autocast work is unaffected). torch 2.13's fp32_precision API."""
    if is_ampere_or_newer(device):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host batch on `device`. To CUDA through pinned memory without blocking: the copy overlaps the GPU work
    still queued from the previous step instead of waiting for it."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)
