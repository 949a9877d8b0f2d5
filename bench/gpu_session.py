"""One GPU bench session: where the models come from and the sizes runs use (Setup), the time budget, and the
results so far, written out after every case."""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

from bench.results import update_results
from gpu_cases import IMAGE_PARTS
from gpu_device import Cuda
from gpu_log import say
from gpu_report import format_report, merge_results
from gpu_speed import peak_flops

OUT_OF_TIME = "not run: time budget (--budget-s) spent"  # the status of a case the budget left out


@dataclass(frozen=True)
class Setup:
    """Where the models' configs come from and the sizes runs use: full size on the GPU, the demo's tiny models in
    a dry run (with small resolutions and lengths)."""
    image_configs: dict  # family → diffusers folder (model_index.json, component configs, tokenizers, scheduler)
    llm_config: Path  # folder with config.json
    resolution: int | None  # None: the fitted config's
    max_length: int | None
    context_start: int
    context_limit: int


def full_setup() -> Setup:
    from studio.families import get_family
    from studio.plan.models import LLM_REFERENCE
    return Setup({f: get_family(f).config_path for f in IMAGE_PARTS}, LLM_REFERENCE, None, None, 1024, 131072)


def dry_setup(work: Path) -> Setup:
    from studio.demo import ensure_demo
    demo = ensure_demo(work / "demo-workspace")
    return Setup({"sd15": demo.sd15, "sdxl": demo.sdxl, "flux1": demo.flux}, demo.llama, 64, 128, 128, 512)


class Session:
    """The run's settings, its results so far, and where they are written after each case."""

    def __init__(self, args, gpu: Cuda, setup: Setup):
        import torch
        self.args, self.gpu, self.setup = args, gpu, setup
        self.work = Path(args.work)
        self.steps = args.steps
        self.deadline = time.monotonic() + args.budget_s
        self.previous: list[dict] = []
        self.meta = {"device": gpu.name(), "total_gb": None if gpu.dry else gpu.total_gb(),
                     "peak_flops": None if gpu.dry else peak_flops(gpu.name()), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(), "steps": self.steps,
                     "dry_run": gpu.dry}
        if args.json and Path(args.json).is_file():
            stored = json.loads(Path(args.json).read_text(encoding="utf-8"))
            self.previous = stored.get("results", [])
        self.results: list[dict] = []

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def record(self, row: dict) -> None:
        self.results = merge_results(self.results, [row])
        say(f"   {row['id']}: {row['status']}" + _summary(row))
        self.save()

    def all_results(self) -> list[dict]:
        return merge_results(self.previous, self.results)

    def report(self) -> str:
        return format_report(self.all_results(), self.meta)

    def save(self) -> None:
        try:
            if self.args.json:
                path = Path(self.args.json)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"meta": self.meta, "results": self.all_results()}, indent=1,
                                          default=str), encoding="utf-8")
                tmp.replace(path)
            if self.args.write:
                update_results("gpu", self.report())
        except Exception as exc:  # noqa: BLE001 - a failed write must not lose the cases still to run
            say(f"   (could not write results: {type(exc).__name__}: {exc})")


def _summary(row: dict) -> str:
    """' — 0.123 s/it, MFU 41.0 %, ...': a recorded row's measurements for the log line."""
    parts = []
    if row.get("s_per_it") is not None:
        parts.append(f"{row['s_per_it']:.3f} s/it")
    if row.get("mfu") is not None:
        parts.append(f"MFU {row['mfu'] * 100:.1f} %")
    if row.get("measured_alloc_gb") is not None:
        parts.append(f"alloc {row['measured_alloc_gb']:.2f} GB vs plan {row['planned_alloc_gb']:.2f}")
    if row.get("seconds") is not None:
        parts.append(f"{row['seconds']:.0f} s")
    return (" — " + ", ".join(parts)) if parts else ""
