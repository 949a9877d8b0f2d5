"""What the loop reports of a run: its start, each update's progress, its end.

Progress comes one update late. Reading an update's loss on the host (`.item()`) makes the host wait until the GPU
has run every kernel queued so far, so the GPU would idle while the host does the update's bookkeeping and launches
the next one. Instead the loss is copied to pinned host memory without blocking, and read once the next update is
queued: the GPU then still has that update to run. When anything else happens after an update (validation, samples,
a checkpoint, a stop, the end, several processes agreeing on a stop), its progress is reported first, as before.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from studio.checkpoints import Position
from studio.config import RunConfig
from studio.distributed import Processes
from studio.events import EventSink
from studio.plan.run import peak_memory

if TYPE_CHECKING:
    from studio.loop import RunResult


class HostCopy:
    """A 0-dim tensor on its way to the host: on CUDA a non-blocking copy into pinned memory and an event after it,
    so `read` waits only for the work that made the value, not for what was queued since."""

    def __init__(self, value: torch.Tensor):
        self.ready = None
        if value.device.type == "cuda":
            self.value = torch.empty((), dtype=value.dtype, pin_memory=True)
            self.value.copy_(value, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.value = value

    def read(self) -> float:
        if self.ready is not None:
            self.ready.synchronize()
        return self.value.item()


class ProgressReports:
    """Each update's progress event, held until `report` (the loop calls it once the next update is queued, or
    before anything else happens)."""

    def __init__(self, events: EventSink, device: torch.device, total: int, start_step: int):
        self.events, self.device, self.total = events, device, total
        self.start_step, self.started = start_step, time.time()
        self.held: tuple[HostCopy, dict] | None = None
        self.last_loss: float | None = None

    def hold(self, pos: Position, loss: torch.Tensor, lr: float) -> None:
        rate = (pos.step - self.start_step) / max(time.time() - self.started, 1e-9)
        self.held = HostCopy(loss), dict(step=pos.step, total=self.total, lr=lr, epoch=pos.epoch, it_per_s=rate,
                                         eta_s=(self.total - pos.step) / rate if rate else None,
                                         **peak_memory(self.device))

    def report(self) -> None:
        if self.held is None:
            return
        (loss, data), self.held = self.held, None
        self.last_loss = loss.read()
        self.events.emit("progress", loss=self.last_loss, **data)


def announce_start(cfg: RunConfig, out: Path, events: EventSink, engine, procs: Processes, pos: Position,
                   total: int) -> None:
    processes = f" x {procs.world} processes" if procs.world > 1 else ""
    events.emit("start", step=pos.step, total=total, message=f"Training {total} steps "
                f"({engine.num_samples()} samples/epoch, effective batch {cfg.effective_batch} = batch "
                f"{cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation{processes}).",
                output_dir=str(out), effective_batch=cfg.effective_batch, num_processes=procs.world,
                earlier_seconds=pos.seconds)  # a resumed run's time so far: the Runs table adds this session's
    if cfg.sample_prompts and not procs.renders_samples and procs.is_main:
        events.emit("log", message="No samples under distributed: fsdp (the model is split over the processes); "
                                   "try the adapter in the Preview tab.")


def announce_end(result: RunResult, events: EventSink) -> RunResult:
    files, stopped = result.files, result.stopped
    events.emit("stopped" if stopped else "done", step=result.step, total=result.total_steps,
                message=f"{'Stopped' if stopped else 'Finished'} at step {result.step}/{result.total_steps}."
                        + (f" Adapter: {files[0]}" if files else ""),
                files=[str(f) for f in files], best_val_loss=result.best_val_loss,
                best_val_step=result.best_val_step)
    return result
