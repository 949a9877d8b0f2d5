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


@dataclass(frozen=True)
class Speed:
    seconds_per_sample: float
    run: str  # the run it was measured in


def run_signature(cfg: RunConfig, family: str, device: str) -> dict:
    """What makes two runs' speeds comparable: the `plan` event carries it."""
    return {"family": family, "device": device, "length": cfg.resolution if cfg.is_image else cfg.max_length,
            "micro_batch": cfg.batch_size, "checkpointing": cfg.gradient_checkpointing,
            "processes": cfg.num_processes}


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


def estimate_text(cfg: RunConfig, runs_dir: Path, signature: dict) -> str:
    """'About 1 h 20 min (at the speed of run X)', or why there is no estimate yet."""
    speed, samples = known_speed(runs_dir, signature), total_samples(cfg)
    if speed is None:
        return "Time: no estimate yet (no earlier run of this model size on this card)."
    if samples is None:
        return f"Time: {speed.seconds_per_sample:.2f} s per sample (run {speed.run}); set max_train_steps for a total."
    return f"Time: about {duration_text(samples * speed.seconds_per_sample)} (at the speed of run {speed.run})."


def duration_text(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
