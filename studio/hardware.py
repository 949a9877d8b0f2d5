"""What machine we train on, and what a run should look like on it.

The only place that picks a torch device and dtype, and the one table that maps (task, model family, memory) to
batch size, resolution, rank, accumulation, checkpointing and precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        # Apple GPUs share system memory; report none so the heuristics stay conservative.
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


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for full fp32."""
    if mixed_precision == "no":
        return None
    if device.type == "cpu" and mixed_precision == "fp16":
        raise StudioError("mixed_precision fp16 is not supported on the CPU. Use bf16 or no.")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise StudioError("mixed_precision bf16 needs an Ampere (RTX 30xx) or newer GPU. Use fp16 on this card.")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def inference_dtype(device: torch.device) -> torch.dtype:
    """Weights dtype for previews: half precision on GPUs (bf16 where the card has it), fp32 elsewhere."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --- VRAM heuristics ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tier:
    """Settings for cards with at least `min_gb` of memory (min_gb None = the CPU row)."""
    min_gb: float | None
    batch_size: int
    resolution: int  # for LLMs: max_length in tokens
    max_rank: int
    gradient_checkpointing: bool
    load_in_4bit: bool = False


# Community rule of thumb: start from rank 8, lr 2e-4, batch 4; when memory is short, lower the batch first
# (keeping the effective batch with gradient accumulation), then the resolution, then the rank. Rank stays <= 64.
# Memory figures are for fp16/bf16 autocast with 8-bit-free AdamW on the LoRA weights only.
TIERS: dict[str, list[Tier]] = {
    "sd15": [  # native 512 px; ~9 GB at batch 4 without checkpointing
        Tier(16, 4, 512, 64, False),
        Tier(12, 2, 512, 64, False),
        Tier(8, 1, 512, 32, True),
        Tier(6, 1, 448, 16, True),
        Tier(0, 1, 384, 8, True),
        Tier(None, 1, 256, 8, False),
    ],
    "sdxl": [  # native 1024 px; the UNet alone is 5 GB in fp16
        Tier(40, 4, 1024, 64, False),
        Tier(24, 2, 1024, 64, True),
        Tier(16, 1, 1024, 32, True),
        Tier(12, 1, 768, 16, True),
        Tier(0, 1, 640, 8, True),
        Tier(None, 1, 512, 8, False),
    ],
    "llm": [  # for a 7B model; thresholds scale with the parameter count. 16-bit 7B weights are 14 GB.
        Tier(40, 4, 2048, 64, False),
        Tier(24, 2, 2048, 64, True),
        Tier(16, 2, 2048, 64, True, load_in_4bit=True),
        Tier(12, 1, 1024, 32, True, load_in_4bit=True),
        Tier(0, 1, 512, 8, True, load_in_4bit=True),
        Tier(None, 1, 512, 8, False),
    ],
}
REFERENCE_LLM_BILLIONS = 7.0
START = {"batch_size": 4, "lora_rank": 8, "learning_rate": 2e-4}


@dataclass
class Recommendation:
    values: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)


def recommend(family: str, memory_gb: float | None, *, bf16: bool = True, start: dict | None = None,
              llm_billions: float = REFERENCE_LLM_BILLIONS) -> Recommendation:
    """Settings for `family` ('sd15', 'sdxl', 'llm') on a card with `memory_gb` (None = CPU).

    `start` holds the preset's intent (batch_size, lora_rank); the result lowers them only when memory requires,
    keeping the effective batch with gradient accumulation.
    """
    start = {**START, **(start or {})}
    tiers = TIERS[family]
    if memory_gb is None:
        tier = tiers[-1]
    else:
        scale = llm_billions / REFERENCE_LLM_BILLIONS if family == "llm" else 1.0
        tier = next(t for t in tiers[:-1] if memory_gb >= t.min_gb * scale)
    where = "CPU" if memory_gb is None else f"{memory_gb:.0f} GB"
    rec = Recommendation()

    def put(key, value, reason):
        rec.values[key] = value
        rec.reasons[key] = reason

    want_batch = int(start["batch_size"])
    batch = min(want_batch, tier.batch_size)
    accum = max(1, want_batch // batch) if memory_gb is not None else 1
    put("batch_size", batch, f"{batch} fits {where}" + (f" (lowered from {want_batch})" if batch < want_batch else ""))
    put("gradient_accumulation_steps", accum,
        f"keeps the effective batch at {batch * accum}" if accum > 1 else "no accumulation needed")
    length_key = "max_length" if family == "llm" else "resolution"
    unit = "tokens" if family == "llm" else "px"
    put(length_key, tier.resolution, f"{tier.resolution} {unit} for {family} on {where}")
    rank = min(int(start["lora_rank"]), tier.max_rank)
    put("lora_rank", rank, f"rank {rank}" + (f" (capped at {tier.max_rank} for {where})"
                                               if rank < int(start["lora_rank"]) else " as the preset asks"))
    put("learning_rate", float(start["learning_rate"]), "the preset's learning rate (effective batch unchanged)")
    put("gradient_checkpointing", tier.gradient_checkpointing,
        "recompute activations to save memory" if tier.gradient_checkpointing else "enough memory without it")
    if memory_gb is None:
        put("mixed_precision", "no", "the CPU trains in fp32")
    else:
        put("mixed_precision", "bf16" if bf16 else "fp16", "bf16 is supported" if bf16 else "this card has no bf16")
    if family == "llm":
        put("load_in_4bit", tier.load_in_4bit, "4-bit NF4 (QLoRA) so the weights fit" if tier.load_in_4bit
            else ("4-bit needs CUDA" if memory_gb is None else "16-bit weights fit"))
    return rec


def recommend_for(hw: Hardware, family: str, start: dict | None = None, **kw) -> Recommendation:
    """`recommend` for the detected hardware (Apple MPS counts as an 8 GB card)."""
    memory = hw.total_gb if hw.device == "cuda" else (8.0 if hw.device == "mps" else None)
    return recommend(family, memory, bf16=hw.bf16 and hw.device == "cuda", start=start, **kw)
