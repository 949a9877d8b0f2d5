"""How long a run will take, from the speed an earlier run of the same family, card and size reached.

Each run's `events.jsonl` holds its `plan` event (family, device, resolution / max_length, effective batch) and its
`progress` events (updates per second); the newest matching finished run gives seconds per sample. No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from studio.config import RunConfig
from studio.data.captions import list_images

LENGTH_KEYS = ("resolution", "max_length")
# Host-to-device copies from pinned memory reach ~25 GB/s on PCIe 4.0 x16 and ~12 GB/s on PCIe 3.0 x16 or a 4.0 x8
# slot (common on consumer boards with two cards): the low end, so an estimate with block swap is not optimistic.
PCIE_GBPS = 12.0
SWAP_PASSES = 2  # a swapped block crosses once for its forward and once for its backward (studio/block_swap.py)


@dataclass(frozen=True)
class Speed:
    seconds_per_sample: float
    run: str  # the run it was measured in


def run_signature(cfg: RunConfig, family: str, device: str) -> dict:
    """What makes two runs' speeds comparable: the `plan` event carries it."""
    return {"family": family, "device": device, "length": cfg.resolution if cfg.is_image else cfg.max_length,
            "micro_batch": cfg.batch_size, "checkpointing": cfg.gradient_checkpointing,
            "processes": cfg.num_processes, **({"blocks_to_swap": cfg.blocks_to_swap} if cfg.blocks_to_swap else {})}


def swap_seconds(swap_bytes: int, bandwidth_gbps: float = PCIE_GBPS) -> float:
    """Seconds of host-to-device copying per training step (one micro-batch's forward and backward) for
    `swap_bytes` of swapped blocks; the side stream hides it as far as each block computes longer than it copies."""
    return SWAP_PASSES * swap_bytes / (bandwidth_gbps * 1e9)


def known_speed(runs_dir: Path, signature: dict) -> Speed | None:
    """The newest earlier run with this signature that made progress, as seconds per sample."""
    logs = sorted(Path(runs_dir).glob("*/events.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs:
        plan, rate, effective = None, None, None
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written
            data = event.get("data", {})
            if event.get("kind") == "plan":
                plan = data.get("signature")
                effective = data.get("effective_batch")
            elif event.get("kind") == "progress" and data.get("it_per_s"):
                rate = data["it_per_s"]
        if plan == signature and rate and effective:
            return Speed(1.0 / (rate * effective), log.parent.name)
    return None


def total_samples(cfg: RunConfig) -> int | None:
    """Samples the run will see: from max_train_steps, else epochs × the image count (None if unknown)."""
    effective = cfg.effective_batch
    if cfg.max_train_steps:
        return cfg.max_train_steps * effective
    folder = Path(cfg.train_data_dir)
    if not cfg.is_image or not folder.is_dir():
        return None
    per_epoch = len(list_images(folder)) * cfg.repeats
    return cfg.epochs * math.ceil(per_epoch / effective) * effective


def estimate_text(cfg: RunConfig, runs_dir: Path, signature: dict, swap_bytes: int | None = None) -> str:
    """'About 1 h 20 min (at the speed of run X)', or why there is no estimate yet. A run with block swap (its
    swapped blocks hold `swap_bytes`: the plan's figure) goes at an earlier run's speed with the same swap, else at
    one without swap plus the copying."""
    speed, samples, copying, swap = known_speed(runs_dir, signature), total_samples(cfg), 0.0, ""
    if speed is None and "blocks_to_swap" in signature:
        speed = known_speed(runs_dir, {k: v for k, v in signature.items() if k != "blocks_to_swap"})
        if swap_bytes is None:
            swap = f", without block swap: streaming {cfg.blocks_to_swap} blocks adds to it"
        else:
            copying = swap_seconds(swap_bytes) / (cfg.batch_size * cfg.num_processes)  # per sample
            swap = (f", plus up to {copying:.2f} s per sample to stream {cfg.blocks_to_swap} swapped blocks at "
                    f"{PCIE_GBPS:.0f} GB/s")
    if speed is None:
        return "Time: no estimate yet (no earlier run of this model size on this card)."
    per_sample = speed.seconds_per_sample + copying
    if samples is None:
        return f"Time: {per_sample:.2f} s per sample (run {speed.run}{swap}); set max_train_steps for a total."
    return f"Time: about {duration_text(samples * per_sample)} (at the speed of run {speed.run}{swap})."


def duration_text(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
