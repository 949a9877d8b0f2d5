"""One case through the real trainer (studio.loop.train) on its emulated card, and what it measured: time per
update, throughput, MFU, the GPU's busy share (gpu_busy.py), peak memory against the plan, back-offs, the last
loss."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

from gpu_busy import PROFILED, BusyProfile
from gpu_cases import Case, case_row
from gpu_device import Cuda
from gpu_log import error_text, say
from gpu_session import OUT_OF_TIME, Session
from gpu_speed import mfu, seconds_per_step, warmup_for


class Watcher:
    """Listens to a run's events: update times and losses, back-offs, token counts, and the peaks while loading: of
    each residency phase before training (encode, cache, and the denoiser's arrival as `train`), all of them together
    as the load peak. From the first update on the peak is one figure (train, sample, validate and save alternate)."""

    def __init__(self, gpu: Cuda, busy: BusyProfile | None = None):
        self.gpu, self.busy = gpu, busy
        self.times: list[float] = []
        self.losses: list[float] = []
        self.backoffs: list[str] = []
        self.tokens = self.rows = self.load_peak = None
        self.phase, self.phase_peaks, self.started = "load", {}, False

    def _end_phase(self) -> None:
        peak = self.gpu.peak_allocated_gb()
        if peak is not None:
            self.phase_peaks[self.phase] = max(peak, self.phase_peaks.get(self.phase, 0.0))
        self.gpu.reset_peak()

    def __call__(self, event) -> None:
        if event.kind == "log" and "phase" in event.data and not self.started:  # the engine's phase lines
            self._end_phase()
            self.phase = event.data["phase"]
        elif event.kind == "start":  # loading is over: from here on it is training
            self._end_phase()
            self.started = True
            self.load_peak = max(self.phase_peaks.values(), default=None)
        elif event.kind == "progress":
            self.times.append(time.perf_counter())
            self.losses.append(event.data.get("loss"))
            if self.busy:
                self.busy.on_update(len(self.times))
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
        row["status"] = OUT_OF_TIME
        return row
    out = session.work / "runs" / case.id.replace("/", "-").replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    try:
        _train_case(session, case, model_dir, data_dir, out, row)
    except Exception as exc:  # noqa: BLE001 - the bench records it and goes on
        row["status"] = f"error: {error_text(exc)}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        session.gpu.free()
    return row


def _train_case(session: Session, case: Case, model_dir: Path, data_dir: Path, out: Path, row: dict) -> None:
    """Train into `out` and fill `row` with the measurements and the status; the trainer's error is the status."""
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
    say(f"-> {case.id}: {row['config']}; plan {row['planned_peak_gb']:.2f} GB ({row['verdict']})")
    try:  # the planned FLOPs of one sample (meta device, a few seconds on the CPU)
        flops = plan_memory(case.fitted.cfg, case.family, case.card_gb, flops=True).flops_per_sample
    except Exception as exc:  # noqa: BLE001
        flops, row["flops_error"] = None, error_text(exc)
    gpu.set_card(case.card_gb)
    leftover = gpu.allocated_gb()
    if leftover and leftover > 0.05:
        row["leftover_gb"] = leftover  # memory an earlier case did not give back: this run had less
    # the last updates profiled, when enough are left before them to time
    watch = Watcher(gpu, BusyProfile(session.steps) if session.steps - PROFILED > 2 * warmup_for(session.steps)
                    else None)
    gpu.reset_peak()
    started, error, result = time.perf_counter(), None, None
    try:
        result = train(cfg, EventSink([watch]))
    except Exception as exc:  # noqa: BLE001
        error = error_text(exc)
    row["seconds"] = time.perf_counter() - started
    if watch.busy:
        watch.busy.close()
    row["measured_alloc_gb"] = gpu.peak_allocated_gb()
    row["measured_reserved_gb"] = gpu.peak_reserved_gb()
    row["load_peak_gb"] = watch.load_peak
    row["measured_phases_gb"] = watch.phase_peaks  # next to planned_phases_gb
    if row["measured_alloc_gb"] is not None and row["planned_alloc_gb"] and not error:
        row["ratio"] = row["measured_alloc_gb"] / row["planned_alloc_gb"]
    _measure_speed(row, watch, cfg, case.family, flops, session.meta.get("peak_flops"))
    if watch.busy and not watch.backoffs:
        row.update(watch.busy.figures)
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
    """s/it, samples/s or tokens/s, and MFU (none for a run that backed off: it ran other settings), over the
    updates before the profiled ones."""
    times = watch.times[:watch.busy.first] if watch.busy and watch.busy.figures else watch.times
    per_step = seconds_per_step(times, warmup_for(len(times)))
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

