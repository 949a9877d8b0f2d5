"""A rough estimate of a run's peak GPU memory, to compare with the card's before pressing Start.

Peak ≈ frozen weights + activations of one micro-batch + LoRA weights with their gradients and AdamW state + the
CUDA context and allocator slack. The reference figures below are for SD1.5 / SDXL / a 7B Llama with PyTorch's SDPA
attention; a local model's size is read from its files (safetensors headers, config.json), so the tiny demo models
get tiny estimates. Expect ±30 %: it says "fits", "tight" or "too big", not how many megabytes are left.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from studio.config import load_preset
from studio.suggest import llm_shape

GB = 2**30
OVERHEAD_GB = 0.8  # CUDA context, cuDNN/cuBLAS workspaces, allocator fragmentation
LORA_TRAIN_BYTES = 16  # fp32 weight + gradient + two AdamW moments per LoRA parameter

# Per family: frozen parameter count (UNet + text encoders + VAE), activation GB per sample at the native
# resolution without / with gradient checkpointing, and LoRA parameters per unit of rank (attention projections).
IMAGE_REFERENCE = {
    "sd15": {"params": 1.07e9, "native": 512, "act": (1.7, 0.45), "lora_per_rank": 0.4e6},
    "sdxl": {"params": 3.5e9, "native": 1024, "act": (5.0, 1.2), "lora_per_rank": 2.9e6},
}
LLM_REFERENCE = {"hidden": 4096, "layers": 32, "vocab": 32000, "billions": 7.0}
LLM_ACT_BYTES = 18  # activation bytes per token, per hidden unit, per layer, 16-bit, no dropout
NF4_BYTES = 0.56  # 4-bit weights plus quantisation constants and the 16-bit embeddings/norms


@dataclass
class MemoryEstimate:
    peak_gb: float
    parts: dict[str, float] = field(default_factory=dict)
    card_gb: float | None = None  # None: no GPU (the run uses system RAM)

    @property
    def verdict(self) -> str:
        if self.card_gb is None:
            return "cpu"
        ratio = self.peak_gb / self.card_gb
        return "fits" if ratio <= 0.9 else ("tight" if ratio <= 1.05 else "too big")

    def summary(self) -> str:
        parts = ", ".join(f"{name} {_size(gb)}" for name, gb in self.parts.items())
        if self.card_gb is None:
            ram = system_ram_gb()
            where = f"no GPU: it runs in system RAM ({ram:.0f} GB)" if ram else "no GPU: it runs in system RAM"
            return f"Estimated peak ≈ {_size(self.peak_gb)} ({parts}); {where}."
        words = {"fits": "fits", "tight": "is tight on", "too big": "is too big for"}
        advice = {"fits": "", "tight": " Lower batch_size or turn on gradient_checkpointing to be safe.",
                  "too big": " Lower batch_size, resolution/max_length or lora_rank, or turn on "
                             "gradient_checkpointing (or load_in_4bit for LLMs)."}
        return (f"Estimated peak ≈ {_size(self.peak_gb)} ({parts}); {words[self.verdict]} this card's "
                f"{self.card_gb:.1f} GB.{advice[self.verdict]}")


def _size(gb: float) -> str:
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1024:.0f} MB"


def estimate_peak_memory(values: dict, family: str, card_gb: float | None) -> MemoryEstimate:
    """Peak memory (GB) of a run whose config keys are `values` (a dict of RunConfig keys; its preset's values and
    the schema defaults fill the rest)."""
    preset = load_preset(str(values["preset"])) if values.get("preset") else {}
    v = {"batch_size": 4, "lora_rank": 8, "resolution": 512, "max_length": 1024, "gradient_checkpointing": False,
         "mixed_precision": "no", "load_in_4bit": False,
         **{k: x for k, x in {**preset, **values}.items() if x is not None}}
    on_gpu = card_gb is not None
    weight_bytes = 2 if on_gpu and v["mixed_precision"] != "no" else 4
    if family == "llm":
        parts = _llm_parts(v, weight_bytes)
    else:
        parts = _image_parts(v, family if family in IMAGE_REFERENCE else "sd15", weight_bytes)
    if on_gpu:
        parts["overhead"] = OVERHEAD_GB
    return MemoryEstimate(sum(parts.values()), parts, card_gb)


def _image_parts(v: dict, family: str, weight_bytes: int) -> dict[str, float]:
    ref = IMAGE_REFERENCE[family]
    params = local_param_count(v.get("base_model", "")) or ref["params"]
    size = params / ref["params"]  # tiny models have proportionally tiny activations (width ~ sqrt(params))
    act_full, act_ckpt = ref["act"]
    per_sample = (act_ckpt if v["gradient_checkpointing"] else act_full) * (int(v["resolution"]) / ref["native"]) ** 2
    per_sample *= math.sqrt(size) * (weight_bytes / 2)
    lora = ref["lora_per_rank"] * int(v["lora_rank"]) * min(1.0, size)
    return {"weights": params * weight_bytes / GB, "activations": per_sample * int(v["batch_size"]),
            "LoRA+optimizer": lora * LORA_TRAIN_BYTES / GB}


def _llm_parts(v: dict, weight_bytes: int) -> dict[str, float]:
    shape = llm_shape(v.get("base_model", "")) or LLM_REFERENCE
    per_param = NF4_BYTES if v["load_in_4bit"] else weight_bytes
    tokens = int(v["batch_size"]) * int(v["max_length"])
    unit = tokens * shape["hidden"] * (weight_bytes / 2)
    if v["gradient_checkpointing"]:  # keep each layer's input, recompute one layer at a time
        activations = unit * (2 * shape["layers"] + LLM_ACT_BYTES)
    else:
        activations = unit * LLM_ACT_BYTES * shape["layers"]
    logits = tokens * shape["vocab"] * 4 * 2  # fp32 logits and their gradient
    # q, k, v, o LoRA: rank × (in + out) per projection, four projections per layer.
    lora = int(v["lora_rank"]) * 8 * shape["hidden"] * shape["layers"]
    return {"weights": shape["billions"] * 1e9 * per_param / GB, "activations": (activations + logits) / GB,
            "LoRA+optimizer": lora * LORA_TRAIN_BYTES / GB}


def local_param_count(model: str) -> float | None:
    """Parameters in a local model (a .safetensors file or a folder of them), from the headers; None if unknown."""
    path = Path(model or "").expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = list(path.rglob("*.safetensors")) or list(path.rglob("*.bin"))
    else:
        return None
    total = 0
    for file in files:
        if file.suffix == ".safetensors":
            total += _safetensors_params(file)
        else:
            total += file.stat().st_size // 4  # pickles: assume fp32
    return float(total) or None


def _safetensors_params(file: Path) -> int:
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError):
        return 0
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def system_ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return None
