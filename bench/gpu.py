"""GPU bench: does the memory planner's config fit each card, how fast does it train, how long a context fits.

On a CUDA machine with >= 24 GB (written for a lent H100/H200: 16 cores, no internet, <= 10 min per command):

1. Builds full-size models with random weights from the shipped configs, no download: SD1.5 and SDXL from
   studio/engines/sd_configs/<family> (each component `from_config` on the GPU, fp16, `save_pretrained` next to the
   shipped model_index.json, tokenizers and scheduler) and Llama 3.1 8B from studio/engines/llm_configs (bf16, built
   on the GPU, saved as a transformers folder with a small byte-level BPE tokenizer trained here, as studio/demo
   does). Plus 16 generated images per image family at its resolution and a chat jsonl with replies longer than
   max_length. All of it lives under --work and is reused by a later run on the same machine.
2. Emulates 24/16/12/8 GB cards with `torch.cuda.set_per_process_memory_fraction((card - 0.6) / device)`: the
   0.6 GB is the CUDA context the plan counts outside torch's allocator (studio.plan.memory.CUDA_CONTEXT_GB), which a
   real card of that size also loses. For each card and model it runs the planner's config
   (`studio.plan.reference.fit_reference`) through the real trainer, `studio.loop.train`, for --steps updates, plus
   variants (fp16 / bf16, adamw / adamw8bit, QLoRA, SD1.5 batch 8). Cases whose fitted configs are identical run
   once, on the smallest card, and the other cards point at that run; plans that say "too big" are not run.
   Measured: s/it after the first 5 updates, samples/s or tokens/s, MFU (planned FLOPs per sample x samples per
   update / s per update / the device's dense bf16 peak), peak allocated memory from the first update on vs the
   plan's allocated part, peak reserved, the load phase's peak, back-offs, and whether the last loss is finite.
3. Longest context of Llama 3.1 8B QLoRA r=32 with gradient checkpointing at a 24 GB cap: a plain transformers+peft
   loop (bitsandbytes NF4, peft's prepare_model_for_kbit_training with its default checkpointing, the model's own
   loss) against the studio trainer's pieces (make_engine + engine.load, engine.collate, engine.loss,
   studio.loop.build_optimizer; one update per length). The trainer itself would reload the 8B model for every
   length tried; the pieces load it once. Lengths double from 1024 until one runs out of memory, then bisect to
   1/8. The plain loop runs first, so anything the first search left behind can only count against the studio.

Run in parts to stay inside a 10-minute command (--only takes any of sd15, sdxl, llm, llm-ctx; all of them take
~15 min and need --budget-s 1000). Estimated times on an H100, model building included:
    python bench/gpu.py --only sd15,sdxl --json $OUT/gpu-images.json     # ~4-5 min (12 cases, 7 runs)
    python bench/gpu.py --only llm --json $OUT/gpu-llm.json              # ~6 min (builds and saves the 8B model)
    python bench/gpu.py --only llm-ctx --json $OUT/gpu-ctx.json          # ~6 min (reuses it if --work still has it)
    python bench/gpu.py --render gpu-images.json gpu-llm.json gpu-ctx.json --write   # anywhere: into RESULTS.md
--json keeps every finished case (written after each one, merged with what the file already holds), --write
updates the `## gpu` section of bench/RESULTS.md after each case, --budget-s (default 420) starts no case and no
context length after that many seconds. --dry-run runs the same code on the CPU with the demo's tiny models
(numbers meaningless; for checking the bench itself). Without CUDA (and without --dry-run / --render) it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never wait on a hub lookup
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars would bury the results in the log
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import update_results  # noqa: E402
from studio.plan.memory import CUDA_CONTEXT_GB  # noqa: E402
from studio.plan.reference import CARDS_GB, fit_reference  # noqa: E402

NO_CUDA = "bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here."
GB = 2**30
PARTS = ("sd15", "sdxl", "llm", "llm-ctx")
MODEL_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "llm": "Llama 3.1 8B"}  # studio.plan.reference.REFERENCES keys
# Cases beside the planner's own config on each card: (label, card GB, the user's keys). Keys a user sets are kept
# by the fit, which fits the rest around them.
VARIANTS = {
    "sd15": [("batch 8", 24, {"batch_size": 8}), ("fp16", 8, {"mixed_precision": "fp16"}),
             ("adamw8bit", 8, {"optimizer": "adamw8bit"})],
    "sdxl": [("fp16", 24, {"mixed_precision": "fp16"})],  # adamw8bit: the planner's own 8 GB config uses it
    "llm": [("QLoRA", 24, {"load_in_4bit": True}), ("adamw8bit", 16, {"optimizer": "adamw8bit"})],
}
# Dense bf16 tensor-core peaks (FLOP/s), matched in order against the device name; sparsity figures are not used.
PEAK_BF16_DENSE = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))
DEFAULT_STEPS, WARMUP = 30, 5
PLAN_TOLERANCE = 0.15  # measured allocated peak within ±15 % of the plan's allocated part
MFU_TARGET = 0.35  # SD1.5, 512 px, batch 8
CONTEXT_TARGET = 4.0  # studio's longest context / the plain loop's
CONTEXT_CARD_GB, CONTEXT_RANK = 24, 32
IMAGES_PER_DATASET, CHATS, REPLY_WORDS = 16, 16, 1500


# ============================================ pure parts (tested on the CPU: tests/test_bench_gpu.py) ===============

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


@dataclass
class Case:
    """One planned run: the planner's config for (model, card) with the user's `keys`."""
    family: str  # sd15 / sdxl / llm
    label: str  # "planner", or the variant's name
    card_gb: float
    keys: dict = field(default_factory=dict)
    fitted: Any = None  # studio.plan.fit.Fitted
    same_as: str | None = None  # id of the case that runs this very config (on a smaller card)
    skip: str | None = None  # why it is not run

    @property
    def id(self) -> str:
        return f"{self.family}/{self.label}/{self.card_gb:g}"


def plan_cases(families: list[str], cards: tuple = CARDS_GB, fit: Callable = fit_reference) -> list[Case]:
    """The cases of each family: the planner's config on each card, then the variants, each fitted by `fit`
    (studio.plan.reference.fit_reference). Identical configs share one run, on the smallest card that should hold
    it; a config the plan calls too big for its card is not run."""
    cases = []
    for family in families:
        group = [Case(family, "planner", card) for card in cards]
        group += [Case(family, label, card, dict(keys)) for label, card, keys in VARIANTS[family]]
        for case in group:
            case.fitted = fit(MODEL_NAMES[family], case.card_gb, **case.keys)
        _share_runs(group)
        cases += group
    return cases


def _signature(cfg) -> str:
    """The config minus the card it was fitted for: equal signatures train the very same way."""
    values = dataclasses.asdict(cfg)
    values.pop("vram_budget_gb", None)
    return json.dumps(values, sort_keys=True, default=str)


def _share_runs(cases: list[Case]) -> None:
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(_signature(case.fitted.cfg), []).append(case)
    for group in groups.values():
        for case in group:
            if case.fitted.plan.verdict == "too big":
                case.skip = f"the plan says too big ({case.fitted.plan.peak_gb:.1f} GB on a {case.card_gb:g} GB card)"
        runnable = [case for case in group if case.skip is None]
        if runnable:
            runner = min(runnable, key=lambda case: case.card_gb)
            for case in runnable:
                if case is not runner:
                    case.same_as = runner.id


def describe_cfg(cfg, family: str) -> str:
    """'4×1, 512 px, bf16, adamw, ckpt off, r8': what the fit decided, in one cell."""
    length = f"{cfg.max_length} tok" if family == "llm" else f"{cfg.resolution} px"
    precision = f"NF4+{cfg.mixed_precision}" if getattr(cfg, "load_in_4bit", False) else cfg.mixed_precision
    return (f"{cfg.batch_size}×{cfg.gradient_accumulation_steps}, {length}, {precision}, {cfg.optimizer}, "
            f"ckpt {'on' if cfg.gradient_checkpointing else 'off'}, r{cfg.lora_rank}")


def case_row(case: Case) -> dict:
    """A result row with what is known before running: the fitted config and its plan."""
    cfg, plan = case.fitted.cfg, case.fitted.plan
    row = {"id": case.id, "kind": "run", "family": case.family, "model": MODEL_NAMES[case.family],
           "case": case.label, "card_gb": case.card_gb, "config": describe_cfg(cfg, case.family),
           "batch_size": cfg.batch_size, "accumulation": cfg.gradient_accumulation_steps,
           "length": cfg.max_length if case.family == "llm" else cfg.resolution,
           "planned_peak_gb": plan.peak_gb, "planned_alloc_gb": plan.allocated_gb, "verdict": plan.verdict,
           "same_as": case.same_as, "status": "pending"}
    if case.skip:
        row["status"] = f"not run: {case.skip}"
    elif case.same_as:
        row["status"] = f"same config as {case.same_as}"
    return row


def search_longest(fits: Callable[[int], bool], start: int, limit: int, granularity: int = 256,
                   out_of_time: Callable[[], bool] = lambda: False) -> tuple[int, int | None]:
    """(longest length that fits, shortest that did not or None) for a `fits(length)` that holds below some length.

    Doubles from `start` up to `limit` until a length fails (halves when `start` already fails), then bisects until
    the gap is under an eighth of the length that fits (and never finer than `granularity`)."""
    ok, bad = 0, None
    length = start
    while not out_of_time():
        if not fits(length):
            bad = length
            break
        ok = length
        if length >= limit:
            break
        length = min(length * 2, limit)
    if not ok and bad is not None:
        length = bad // 2
        while length >= granularity and not out_of_time():
            if fits(length):
                ok = length
                break
            bad, length = length, length // 2
    while ok and bad is not None and bad - ok > max(granularity, ok // 8) and not out_of_time():
        middle = (ok + bad) // 2 // granularity * granularity
        if middle <= ok or middle >= bad:
            break
        if fits(middle):
            ok = middle
        else:
            bad = middle
    return ok, bad


def merge_results(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of both, a new row replacing the old one with its id (in the old one's place)."""
    merged = {row["id"]: row for row in old}
    merged.update({row["id"]: row for row in new})
    return list(merged.values())


# --- the report ------------------------------------------------------------------------------------------------------

def _f(value, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def _by_id(results: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in results}


def _measured(row: dict, results: list[dict]) -> dict:
    """The row that holds a case's measurements: its own, or that of the run it shares."""
    return _by_id(results).get(row.get("same_as") or "", row)


def target_rows(results: list[dict]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met: True / False / None when not measured)."""
    rows = _by_id(results)
    out = []

    b8 = rows.get("sd15/batch 8/24")
    value = b8.get("mfu") if b8 and b8.get("status") == "ok" else None
    text = "not measured" if value is None else f"{value * 100:.1f} % ({b8['config']})"
    out.append((f"SD1.5 512 px batch 8: MFU ≥ {MFU_TARGET * 100:.0f} %", text,
                None if value is None else value >= MFU_TARGET and b8["length"] == 512 and b8["batch_size"] == 8))

    xl = rows.get("sdxl/planner/24")
    run = _measured(xl, results) if xl else None
    if not xl or not run or run.get("status") == "pending" or "measured_alloc_gb" not in run:
        out.append(("SDXL 1024 px on a 24 GB card: fits with batch ≥ 2", "not measured", None))
    else:
        ok = run["status"] == "ok" and xl["batch_size"] >= 2 and xl["length"] == 1024
        where = "" if run is xl else f" (the {run['card_gb']:g} GB run)"
        out.append(("SDXL 1024 px on a 24 GB card: fits with batch ≥ 2",
                    f"{xl['config']}: {run['status']}{where}, {_f(run.get('measured_reserved_gb'), '.1f', ' GB')} "
                    f"reserved", ok))

    measured = [r for r in results if r.get("kind") == "run" and r.get("ratio") is not None]
    backed = [r for r in results if r.get("kind") == "run" and r.get("backoffs")]
    if not measured:
        out.append((f"plan within ±{PLAN_TOLERANCE * 100:.0f} % of measured (allocated)", "not measured", None))
    else:
        inside = [r for r in measured if abs(r["ratio"] - 1) <= PLAN_TOLERANCE]
        worst = max(measured, key=lambda r: abs(r["ratio"] - 1))
        text = (f"{len(inside)} of {len(measured)} runs; worst {worst['id']} measured/planned {worst['ratio']:.2f}"
                + (f"; {len(backed)} run(s) backed off" if backed else ""))
        out.append((f"plan within ±{PLAN_TOLERANCE * 100:.0f} % of measured (allocated)", text,
                    len(inside) == len(measured) and not backed))

    ctx = rows.get("llm-ctx")
    plain = (ctx or {}).get("plain", {}).get("longest")
    studio = (ctx or {}).get("studio", {}).get("longest")
    label = f"8B QLoRA r={CONTEXT_RANK}, {CONTEXT_CARD_GB} GB: context ≥ {CONTEXT_TARGET:g}× the plain loop's"
    if not plain or studio is None:
        out.append((label, "not measured", None))
    else:
        ratio = studio / plain
        out.append((label, f"{studio:,} vs {plain:,} tokens = {ratio:.2f}×", ratio >= CONTEXT_TARGET))
    return out


def _throughput(row: dict) -> str:
    if row.get("tokens_per_s") is not None:
        return f"{row['tokens_per_s']:,.0f} tok/s"
    return _f(row.get("samples_per_s"), ".2f", " img/s")


def _run_line(row: dict) -> str:
    shared = row.get("same_as")
    if shared or row["status"].startswith("not run"):
        measured = ["—"] * 8
    else:
        ratio = row.get("ratio")
        percent = None if row.get("mfu") is None else row["mfu"] * 100
        measured = [_f(row.get("s_per_it"), ".3f"), _throughput(row), _f(percent, ".1f", " %"),
                    _f(row.get("measured_alloc_gb"), ".2f"), _f(ratio, ".2f"),
                    _f(row.get("measured_reserved_gb"), ".2f"), _f(row.get("load_peak_gb"), ".2f"),
                    _f(row.get("loss"), ".4g")]
        if ratio is not None and abs(ratio - 1) > PLAN_TOLERANCE:
            measured[4] = f"**{measured[4]}**"
    status = row["status"] + (f" (started with {row['leftover_gb']:.1f} GB left by an earlier run)"
                              if row.get("leftover_gb") else "")
    cells = [row["model"], row["case"], f"{row['card_gb']:g} GB", row["config"], status,
             f"{row['planned_alloc_gb']:.2f} / {row['planned_peak_gb']:.2f}"] + measured
    return "| " + " | ".join(cells) + " |"


def _context_lines(ctx: dict) -> list[str]:
    lines = ["### Longest context: Llama 3.1 8B, QLoRA r=32, gradient checkpointing, 24 GB card", "",
             f"Studio side: {ctx.get('config', '?')}. One update (forward, backward, optimizer step) per length; "
             f"lengths double from {ctx.get('start', '?')} (the studio's from the plain loop's longest), then bisect "
             "to 1/8.", "",
             "| loop | longest that trained | shortest that ran out of memory | s/update there | tokens/s there | "
             "peak allocated there | lengths tried |", "|---|---|---|---|---|---|---|"]
    for side, name in (("plain", "plain transformers+peft (NF4, checkpointing, model loss)"),
                       ("studio", "studio (engine.load / collate / loss, build_optimizer)")):
        data = ctx.get(side) or {}
        if data.get("error"):
            lines.append(f"| {name} | error: {data['error']} | | | | | {len(data.get('tries', []))} |")
            continue
        best = next((t for t in data.get("tries", []) if t[1] and t[0] == data.get("longest")), None)
        seconds = best[2] if best else None
        lines.append(f"| {name} | {_f(data.get('longest'), ',')} | {_f(data.get('first_failed'), ',')} | "
                     f"{_f(seconds, '.2f')} | {_f(seconds and data['longest'] / seconds, ',.0f')} | "
                     f"{_f(best[3] if best else None, '.2f', ' GB')} | {len(data.get('tries', []))} |")
    if ctx.get("planned_longest") is not None:
        lines += ["", f"The planner's longest fitting max_length for the studio side: {ctx['planned_longest']:,} "
                      f"(fits = planned peak ≤ 92 % of the card)."
                  + (f" At the studio's longest, {ctx['studio']['longest']:,}: planned allocated "
                     f"{ctx['planned_alloc_at_longest_gb']:.2f} GB, measured {ctx['measured_alloc_at_longest_gb']:.2f}"
                     " GB." if ctx.get("planned_alloc_at_longest_gb") and ctx.get("measured_alloc_at_longest_gb")
                     else "")]
    return lines


def format_report(results: list[dict], meta: dict) -> str:
    """The markdown section: device, targets, every run, the context search."""
    peak = meta.get("peak_flops")
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"
    lines = [f"**{meta.get('device', '?')}** ({_f(meta.get('total_gb'), '.1f', ' GiB')}, dense bf16 peak "
             f"{peak_text}), {meta.get('date', '?')}, torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '?')}.",
             "",
             f"Full-size models with random weights built from the shipped configs. Cards emulated with "
             f"`torch.cuda.set_per_process_memory_fraction((card − {CUDA_CONTEXT_GB} GB context) / device memory)`. "
             f"Every run is `studio.loop.train` on `fit_reference(model, card, **keys).cfg` for "
             f"{meta.get('steps', '?')} updates (the first {warmup_for(meta.get('steps') or DEFAULT_STEPS)} not "
             f"timed). Memory in GB (2^30 bytes); \"allocated\" is torch's max_memory_allocated from the first "
             f"update on, against the plan's allocated part (its peak less the CUDA context); \"load\" is the peak "
             f"while loading.", ""]
    if meta.get("dry_run"):
        lines += ["**DRY RUN on the CPU with the demo's tiny models: the numbers mean nothing.**", ""]
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, text, met in target_rows(results):
        lines.append(f"| {target} | {text} | {'—' if met is None else 'yes' if met else '**no**'} |")
    runs = [row for row in results if row.get("kind") == "run"]
    if runs:
        lines += ["", "### Runs", "",
                  "| model | case | card | config (micro-batch×accum.) | result | planned alloc / peak | s/it | "
                  "throughput | MFU | measured alloc | meas./plan | reserved | load | last loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_run_line(row) for row in runs]
    ctx = _by_id(results).get("llm-ctx")
    if ctx:
        lines += [""] + _context_lines(ctx)
        if ctx.get("status", "ok") != "ok":
            lines += ["", f"Context search: {ctx['status']}"]
    errors = [row for row in results if row.get("kind") == "error"]
    if errors:
        lines += ["", "### Errors", ""] + [f"- {row['id']}: {row['status']}" for row in errors]
    return "\n".join(lines)


# ============================================ the GPU side ==========================================================

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
            _print(f"   (freeing GPU memory failed: {_error_text(exc)})")

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
    from studio.engines.single_file import default_config_dir
    from studio.plan.models import LLM_REFERENCE
    return Setup({f: default_config_dir(f) for f in ("sd15", "sdxl")}, LLM_REFERENCE, None, None, 1024, 131072)


def dry_setup(work: Path) -> Setup:
    from studio.demo import ensure_demo
    demo = ensure_demo(work / "demo-workspace")
    return Setup({"sd15": demo.sd15, "sdxl": demo.sdxl}, demo.llama, 64, 128, 128, 512)


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
        _print(f"   {row['id']}: {row['status']}" + _summary(row))
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
            _print(f"   (could not write results: {type(exc).__name__}: {exc})")


def _print(text: str) -> None:
    print(text, flush=True)


def _summary(row: dict) -> str:
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


def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300].replace("|", "/")


def _is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def _quiet_libraries() -> None:
    import warnings
    warnings.filterwarnings("ignore")
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
            module.set_verbosity_error()
            module.disable_progress_bar()
        except Exception:  # noqa: BLE001
            pass


# --- models and data -------------------------------------------------------------------------------------------------

def _done(folder: Path) -> bool:
    return (folder / ".bench-complete").is_file()


def build_image_model(config_dir: Path, out: Path, gpu: Cuda) -> Path:
    """A diffusers folder of random-init fp16 weights for the configs in `config_dir` (reused when complete)."""
    import importlib

    import torch
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(config_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", ".demo-version"))
    index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        library, cls_name = (index.get(name) or [None, None])[:2]
        if not cls_name:
            continue
        config = json.loads((out / name / "config.json").read_text(encoding="utf-8"))
        cls = getattr(importlib.import_module(library), cls_name)
        torch.manual_seed(0)
        with torch.device(gpu.device):
            module = cls.from_config(config) if library == "diffusers" else cls(cls.config_class.from_dict(config))
        module.to(gpu.device, torch.float16).save_pretrained(out / name)
        del module
        gpu.free()
    (out / ".bench-complete").write_text("ok")
    return out


def make_image_data(out: Path, resolution: int) -> Path:
    """IMAGES_PER_DATASET distinct square PNGs at `resolution` with a metadata.csv."""
    from PIL import ImageDraw

    from studio.data.captions import write_csv_captions
    from studio.demo.datasets import COLOURS, SHAPES, draw_shape
    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(IMAGES_PER_DATASET):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        image = draw_shape(shape, colour, (resolution, resolution))
        stripe = resolution * (i + 1) // (IMAGES_PER_DATASET + 1)
        ImageDraw.Draw(image).rectangle((0, 0, stripe, resolution // 16), fill=(30 + 13 * i, 90, 160))
        name = f"{i:02d}-{colour}-{shape}.png"
        image.save(out / name)
        captions[name] = f"a {colour} {shape}, flat colour, white background, stripe {i}"
    write_csv_captions(out / "metadata.csv", captions)
    (out / ".bench-complete").write_text("ok")
    return out


def chat_conversations() -> list[list[dict]]:
    """CHATS conversations whose replies run past any max_length the planner picks (so every row is full)."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ra", "tu", "shi", "po", "ve", "di", "an", "el", "or", "um", "ba", "ze"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    return [[{"role": "system", "content": "You are a storyteller."},
             {"role": "user", "content": f"Tell story number {i}."},
             {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(REPLY_WORDS)) + "."}]
            for i in range(CHATS)]


def make_chat_data(out: Path, chats: list[list[dict]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    return out


def build_llm_model(config_dir: Path, out: Path, chats: list[list[dict]], gpu: Cuda) -> Path:
    """A transformers folder: random-init bf16 weights for `config_dir`'s config.json and a tokenizer trained on
    the chats (its ids are all inside the model's vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from studio.demo.tokenizers import build_llama_tokenizer
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = build_llama_tokenizer([m["content"] for chat in chats for m in chat])
    config = AutoConfig.from_pretrained(str(config_dir))
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    torch.manual_seed(0)
    with torch.device(gpu.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to(gpu.device).save_pretrained(out, max_shard_size="5GB")
    del model
    gpu.free()
    tokenizer.save_pretrained(out)
    (out / ".bench-complete").write_text("ok")
    return out


# --- one run through the trainer --------------------------------------------------------------------------------------

class Watcher:
    """Listens to a run's events: update times and losses, back-offs, token counts, and the load phase's peak."""

    def __init__(self, gpu: Cuda):
        self.gpu = gpu
        self.times: list[float] = []
        self.losses: list[float] = []
        self.backoffs: list[str] = []
        self.tokens = self.rows = self.load_peak = None

    def __call__(self, event) -> None:
        if event.kind == "start":  # loading is over: from here on it is training
            self.load_peak = self.gpu.peak_allocated_gb()
            self.gpu.reset_peak()
        elif event.kind == "progress":
            self.times.append(time.perf_counter())
            self.losses.append(event.data.get("loss"))
        elif event.kind == "backoff":
            self.backoffs.append(event.message)
        elif event.kind == "log" and "tokens" in event.data:
            self.tokens, self.rows = event.data.get("tokens"), event.data.get("rows")


def run_case(session: Session, case: Case, model_dir: Path, data_dir: Path) -> dict:
    """Train the case's fitted config for --steps updates on its emulated card; every failure becomes the row's
    status."""
    row = case_row(case)
    if case.skip or case.same_as:
        return row
    if case.card_gb > session.gpu.total_gb():
        row["status"] = f"not run: the device has {session.gpu.total_gb():.0f} GB"
        return row
    if session.out_of_time():
        row["status"] = "not run: time budget (--budget-s) spent"
        return row
    out = session.work / "runs" / case.id.replace("/", "-").replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    try:
        _train_case(session, case, model_dir, data_dir, out, row)
    except Exception as exc:  # noqa: BLE001 - the bench records it and goes on
        row["status"] = f"error: {_error_text(exc)}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        session.gpu.free()
    return row


def _train_case(session: Session, case: Case, model_dir: Path, data_dir: Path, out: Path, row: dict) -> None:
    from studio.events import EventSink
    from studio.loop import train
    from studio.plan.memory import plan_memory

    setup, gpu = session.setup, session.gpu
    sizes = {}
    if setup.resolution and case.family != "llm":
        sizes["resolution"] = setup.resolution
    if setup.max_length and case.family == "llm":
        sizes["max_length"] = setup.max_length
    cfg = dataclasses.replace(case.fitted.cfg, base_model=str(model_dir), train_data_dir=str(data_dir),
                              output_dir=str(out), max_train_steps=session.steps, save_steps=0, sample_prompts=[],
                              sample_every_steps=0, **sizes)
    _print(f"-> {case.id}: {row['config']}; plan {row['planned_peak_gb']:.2f} GB ({row['verdict']})")
    try:  # the planned FLOPs of one sample (meta device, a few seconds on the CPU)
        flops = plan_memory(case.fitted.cfg, case.family, case.card_gb, flops=True).flops_per_sample
    except Exception as exc:  # noqa: BLE001
        flops, row["flops_error"] = None, _error_text(exc)
    gpu.set_card(case.card_gb)
    leftover = gpu.allocated_gb()
    if leftover and leftover > 0.05:
        row["leftover_gb"] = leftover  # memory an earlier case did not give back: this run had less
    watch = Watcher(gpu)
    gpu.reset_peak()
    started, error, result = time.perf_counter(), None, None
    try:
        result = train(cfg, EventSink([watch]))
    except Exception as exc:  # noqa: BLE001
        error = _error_text(exc)
    row["seconds"] = time.perf_counter() - started
    row["measured_alloc_gb"] = gpu.peak_allocated_gb()
    row["measured_reserved_gb"] = gpu.peak_reserved_gb()
    row["load_peak_gb"] = watch.load_peak
    if row["measured_alloc_gb"] is not None and row["planned_alloc_gb"] and not error:
        row["ratio"] = row["measured_alloc_gb"] / row["planned_alloc_gb"]
    _measure_speed(row, watch, cfg, case.family, flops, session.meta.get("peak_flops"))
    row["backoffs"] = watch.backoffs
    loss = result.last_loss if result is not None else (watch.losses[-1] if watch.losses else None)
    row["loss"] = loss
    row["updates"] = len(watch.times)
    if error:
        row["status"] = f"error: {error}" + (f" (after {len(watch.backoffs)} back-off(s))" if watch.backoffs else "")
    elif watch.backoffs:
        row["status"] = f"backed off {len(watch.backoffs)}×: {watch.backoffs[0]}"[:300].replace("|", "/")
        row["ratio"] = None  # the run ended on other settings than planned
    elif loss is None or not math.isfinite(loss):
        row["status"] = f"loss not finite ({loss})"
    else:
        row["status"] = "ok"


def _measure_speed(row: dict, watch: Watcher, cfg, family: str, flops: float | None, peak: float | None) -> None:
    per_step = seconds_per_step(watch.times, warmup_for(len(watch.times)))
    samples = cfg.batch_size * cfg.gradient_accumulation_steps
    row["s_per_it"] = per_step
    row["flops_per_sample"] = flops
    if per_step is None:
        return
    if family == "llm":
        length = watch.tokens / watch.rows if watch.tokens and watch.rows else cfg.max_length
        row["tokens_per_s"] = length * samples / per_step
        if flops:  # the plan counts full rows; shorter rows do proportionally less work
            flops = flops * min(1.0, length / cfg.max_length)
    else:
        row["samples_per_s"] = samples / per_step
    row["mfu"] = None if watch.backoffs else mfu(flops, samples, per_step, peak)


# --- the longest context -------------------------------------------------------------------------------------------

class PlainLoop:
    """What a transformers+peft user writes for QLoRA: NF4 loading, prepare_model_for_kbit_training (its default
    gradient checkpointing), the same LoRA, the model's own loss."""

    def __init__(self, model_dir: Path, cfg, gpu: Cuda):
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from studio.engines.llm import target_modules
        self.torch, self.gpu = torch, gpu
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": gpu.device})
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=target_modules(model, cfg.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.vocab = self.model.config.vocab_size
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.learning_rate)

    def step(self, length: int) -> float:
        torch = self.torch
        ids = torch.randint(0, self.vocab, (1, length), device=self.gpu.device)
        try:
            with torch.autocast(self.gpu.device, dtype=torch.bfloat16):
                loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            self.optimizer.step()
            return loss.item()
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.model = self.optimizer = None


class StudioLoop:
    """The trainer's own pieces for one update: engine.load (4-bit loading, k-bit preparation, checkpointing, LoRA),
    engine.collate and engine.loss, studio.loop.build_optimizer, the loop's gradient clipping."""

    def __init__(self, cfg, gpu: Cuda):
        import torch

        from studio.engines import make_engine
        from studio.events import EventSink
        from studio.hardware import autocast_dtype
        from studio.loop import build_optimizer
        self.torch, self.cfg = torch, cfg
        self.device = torch.device(gpu.device)
        self.autocast = autocast_dtype(cfg.mixed_precision, self.device)
        self.engine = make_engine(cfg, self.device, self.autocast, EventSink())
        self.engine.load()
        self.engine.train_mode(True)
        self.optimizer = build_optimizer(cfg, self.engine.param_groups(), self.device)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.vocab = self.engine.model.config.vocab_size
        self.rng = torch.Generator().manual_seed(cfg.seed)

    def step(self, length: int) -> float:
        from contextlib import nullcontext

        from studio.data.text import Example
        torch = self.torch
        ids = torch.randint(0, self.vocab, (length,), generator=self.rng).tolist()
        self.engine.examples = [Example(ids, list(ids), list(range(length)))]
        batch = self.engine.collate([0], 0)
        try:
            with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext():
                loss = self.engine.loss(batch, self.rng)
            loss.backward()
            if self.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
            return loss.item()
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.engine = self.optimizer = self.params = None


def _search_side(session: Session, make_loop: Callable, start: int, seconds: float) -> dict:
    """Load one loop, then search its longest trainable length within `seconds` (and the session's budget)."""
    gpu, setup = session.gpu, session.setup
    side: dict = {"tries": []}
    loop = None
    try:
        loaded = time.perf_counter()
        loop = make_loop()
        side["load_s"] = time.perf_counter() - loaded
        side["baseline_alloc_gb"] = gpu.allocated_gb()
        stop_at = time.monotonic() + seconds

        def fits(length: int) -> bool:
            gpu.reset_peak()
            began, ok, loss = time.perf_counter(), True, None
            try:
                loss = loop.step(length)
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                ok = False
            gpu.free()  # after the except block: the error's frames (and the step's tensors) are gone
            side["tries"].append([length, ok, time.perf_counter() - began, gpu.peak_allocated_gb(), loss])
            _print(f"   {length:>7,} tokens: {'ok' if ok else 'out of memory'} ({side['tries'][-1][2]:.1f} s)")
            return ok

        side["longest"], side["first_failed"] = search_longest(
            fits, start, setup.context_limit, out_of_time=lambda: time.monotonic() > stop_at or session.out_of_time())
        if side["first_failed"] is None and side["longest"] < setup.context_limit:
            side["note"] = "search stopped by the time limit"
    except Exception as exc:  # noqa: BLE001
        side["error"] = _error_text(exc)
    finally:
        if loop is not None:
            loop.close()
        loop = None
        gpu.free()
    return side


def run_context(session: Session, model_dir: Path, data_dir: Path) -> dict:
    """The longest context of the plain loop and of the studio trainer, QLoRA r=32 with checkpointing, 24 GB."""
    from studio.plan.memory import plan_memory
    gpu, setup = session.gpu, session.setup
    row: dict = {"id": "llm-ctx", "kind": "context", "family": "llm", "model": MODEL_NAMES["llm"],
                 "card_gb": CONTEXT_CARD_GB, "status": "pending"}
    if session.out_of_time():
        row["status"] = "not run: time budget (--budget-s) spent"
        return row
    try:
        fitted = fit_reference(MODEL_NAMES["llm"], CONTEXT_CARD_GB, load_in_4bit=True, lora_rank=CONTEXT_RANK,
                               gradient_checkpointing=True, batch_size=1, gradient_accumulation_steps=1)
        cfg = dataclasses.replace(fitted.cfg, base_model=str(model_dir), train_data_dir=str(data_dir),
                                  output_dir=str(session.work / "runs" / "context"),
                                  max_length=setup.max_length or fitted.cfg.max_length)
        row["config"], row["start"] = describe_cfg(cfg, "llm"), setup.context_start
        _print(f"-> llm-ctx: {row['config']}")
        plan_at = lambda n: plan_memory(dataclasses.replace(fitted.cfg, max_length=n), "llm", CONTEXT_CARD_GB)  # noqa
        row["planned_longest"], _ = search_longest(lambda n: plan_at(n).fits, 1024, 131072)
        gpu.set_card(CONTEXT_CARD_GB)
        if gpu.dry:
            from studio.engines.llm import LLMEngine
            LLMEngine.four_bit_needs_cuda = False  # bitsandbytes' CPU backend, as the tests use it
        # The plain loop's lengths are short and quick; the studio's search starts where the plain one ended.
        _print("   plain transformers+peft loop:")
        row["plain"] = _search_side(session, lambda: PlainLoop(model_dir, cfg, gpu), setup.context_start,
                                    max(30.0, 0.35 * (session.deadline - time.monotonic())))
        start = max(setup.context_start, row["plain"].get("longest") or 0)
        _print("   studio:")
        row["studio"] = _search_side(session, lambda: StudioLoop(cfg, gpu), start,
                                     max(30.0, session.deadline - time.monotonic()))
        longest = row["studio"].get("longest")
        best = next((t for t in row["studio"]["tries"] if t[1] and t[0] == longest), None)
        if longest and best and best[3] is not None:
            row["planned_alloc_at_longest_gb"] = plan_at(longest).allocated_gb
            row["measured_alloc_at_longest_gb"] = best[3]
        errors = [f"{side}: {row[side]['error']}" for side in ("plain", "studio") if row[side].get("error")]
        row["status"] = "; ".join(errors) if errors else "ok"
    except Exception as exc:  # noqa: BLE001
        row["status"] = f"error: {_error_text(exc)}"
    finally:
        gpu.free()
    return row


# --- the parts -------------------------------------------------------------------------------------------------------

def run_image_part(session: Session, family: str) -> None:
    """Build the family's model and data once, then run each planned case."""
    _print(f"== {MODEL_NAMES[family]}")
    try:
        cases = plan_cases([family])
    except Exception as exc:  # noqa: BLE001
        session.record({"id": f"{family}/planner", "kind": "error", "status": f"error: planning: {_error_text(exc)}"})
        return
    try:
        session.gpu.set_card(None)  # building needs the whole device
        built = time.perf_counter()
        model = build_image_model(session.setup.image_configs[family], session.work / "models" / family, session.gpu)
        resolution = session.setup.resolution or max(c.fitted.cfg.resolution for c in cases)
        data = make_image_data(session.work / "data" / f"{family}-{resolution}", resolution)
        _print(f"   model and data ready ({time.perf_counter() - built:.0f} s)")
    except Exception as exc:  # noqa: BLE001
        for case in cases:
            row = case_row(case)
            if row["status"] == "pending":
                row["status"] = f"error: building the model: {_error_text(exc)}"
            session.record(row)
        return
    for case in cases:
        session.record(run_case(session, case, model, data))


def _make_room(work: Path, need_gb: float) -> None:
    """Remove the image models (rebuilt in a minute when needed) if the disk has less than `need_gb` free."""
    if shutil.disk_usage(work).free / GB < need_gb:
        for family in ("sd15", "sdxl"):
            shutil.rmtree(work / "models" / family, ignore_errors=True)


def run_llm_parts(session: Session, parts: list[str]) -> None:
    _print("== Llama 3.1 8B")
    cases = []
    if "llm" in parts:
        try:
            cases = plan_cases(["llm"])
        except Exception as exc:  # noqa: BLE001
            session.record({"id": "llm/planner", "kind": "error", "status": f"error: planning: {_error_text(exc)}"})
    try:
        session.gpu.set_card(None)
        _make_room(session.work, need_gb=20)
        built = time.perf_counter()
        chats = chat_conversations()
        data = make_chat_data(session.work / "data" / "chat", chats)
        model = build_llm_model(session.setup.llm_config, session.work / "models" / "llm", chats, session.gpu)
        _print(f"   model and data ready ({time.perf_counter() - built:.0f} s)")
    except Exception as exc:  # noqa: BLE001
        for case in cases:
            row = case_row(case)
            if row["status"] == "pending":
                row["status"] = f"error: building the model: {_error_text(exc)}"
            session.record(row)
        if "llm-ctx" in parts:
            session.record({"id": "llm-ctx", "kind": "context", "status": f"error: building the model: "
                                                                          f"{_error_text(exc)}"})
        return
    for case in cases:
        session.record(run_case(session, case, model, data))
    if "llm-ctx" in parts:
        session.record(run_context(session, model, data))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="updates per run (the first few untimed)")
    parser.add_argument("--write", action="store_true", help="update the '## gpu' section of bench/RESULTS.md")
    parser.add_argument("--json", help="keep the results in this JSON file (merged with what it holds)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "studio-gpu-bench"),
                        help="where models, data and runs go (models are reused)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no case after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny models")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only merge these result files and report")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    if args.dry_run and args.write:
        parser.error("--dry-run numbers mean nothing: it does not --write")
    return args


def render(paths: list[str], write: bool) -> str:
    results, metas = [], []
    for path in paths:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
        results = merge_results(results, stored.get("results", []))
        metas.append(stored.get("meta", {}))
    meta = dict(metas[0]) if metas else {}
    devices = sorted({m.get("device", "?") for m in metas})
    if len(devices) > 1:
        meta["device"] = " + ".join(devices) + " (parts on different devices)"
    meta["date"] = max((m.get("date", "") for m in metas), default="?")
    report = format_report(results, meta)
    if write:
        update_results("gpu", report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        _print(render(args.render, args.write))
        return 0
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        _print(NO_CUDA)
        return 0
    _quiet_libraries()
    gpu = DryCpu() if args.dry_run else Cuda()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    setup = dry_setup(work) if args.dry_run else full_setup()
    session = Session(args, gpu, setup)
    free_disk = shutil.disk_usage(work).free / GB
    _print(f"{session.meta['device']}: {_f(session.meta['total_gb'], '.1f', ' GiB')}, peak "
           f"{_f(session.meta['peak_flops'] and session.meta['peak_flops'] / 1e12, '.0f', ' TFLOP/s')}; parts "
           f"{', '.join(args.parts)}; {args.steps} steps; work {work} ({free_disk:.0f} GB free disk)")
    parts = [(family, lambda family=family: run_image_part(session, family)) for family in ("sd15", "sdxl")
             if family in args.parts]
    if "llm" in args.parts or "llm-ctx" in args.parts:
        parts.append(("llm", lambda: run_llm_parts(session, args.parts)))
    try:
        for name, run in parts:
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a part that breaks must not take the others with it
                session.record({"id": f"{name}/part", "kind": "error", "status": f"error: {_error_text(exc)}"})
    finally:
        _print("\n" + session.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
