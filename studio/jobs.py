"""The background training runner: one job at a time, start / stop, and a snapshot any page can poll.

The studio creates one `JobRunner` for the process — the GPU is one shared resource, so every browser tab sees the
same job, and reloading the page reattaches to it.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from studio.config import RunConfig
from studio.errors import StudioError
from studio.events import FINAL_KINDS, Event, EventSink


@dataclass
class JobState:
    status: str = "idle"  # idle, running, stopping, done, stopped, failed
    name: str = ""
    output_dir: str = ""
    step: int = 0
    total: int = 0
    it_per_s: float | None = None
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    error: str = ""
    planned_gb: float | None = None  # the memory plan's allocated peak
    peak_gb: float | None = None  # measured on CUDA: torch.cuda.max_memory_allocated so far


class JobRunner:
    LOG_LINES = 200

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = JobState()
        self._log: deque[str] = deque(maxlen=self.LOG_LINES)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, cfg: RunConfig, fitted=None) -> None:
        """Run `cfg` in the background; `fitted` (studio.plan.fit.Fitted) carries the fit's reasons and plan."""
        with self._lock:
            if self.running:
                raise StudioError(f"A training job ({self._state.name}) is already running. Wait for it to "
                                  "finish or cancel it before starting another.")
            self._stop = threading.Event()
            self._state = JobState(status="running", name=cfg.name, output_dir=cfg.output_dir)
            self._log.clear()
            self._thread = threading.Thread(target=self._work, args=(cfg, fitted), name=f"train-{cfg.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> bool:
        """Ask the running job to stop at the next step boundary (it saves a checkpoint first)."""
        with self._lock:
            if not self.running:
                return False
            self._stop.set()
            self._state.status = "stopping"
            return True

    def wait(self, timeout: float | None = None) -> JobState:
        if self._thread:
            self._thread.join(timeout)
        return self.snapshot()

    def snapshot(self) -> JobState:
        with self._lock:
            s = self._state
            return JobState(s.status, s.name, s.output_dir, s.step, s.total, s.it_per_s, s.eta_s, list(s.losses),
                            list(self._log), list(s.samples), list(s.files), s.error, s.planned_gb, s.peak_gb)

    def _work(self, cfg: RunConfig, fitted) -> None:
        from studio.loop import train  # imported in the thread: torch/diffusers load off the UI's start-up path

        try:
            train(cfg, EventSink([self._on_event]), self._stop, fitted=fitted)
        except Exception as exc:  # noqa: BLE001 - the loop reports its failures as a 'failed' event...
            with self._lock:  # ...this is the safety net for one that never got reported: never stay 'running'
                if self._state.status not in FINAL_KINDS:
                    self._state.status, self._state.error = "failed", f"Training failed: {exc}"

    def _on_event(self, event: Event) -> None:
        with self._lock:
            s = self._state
            s.step, s.total = event.step or s.step, event.total or s.total
            if event.kind == "progress":
                s.losses.append((event.step, event.data["loss"]))
                s.it_per_s, s.eta_s = event.data.get("it_per_s"), event.data.get("eta_s")
                s.peak_gb = event.data.get("peak_allocated_gb", s.peak_gb)
            elif event.kind == "plan":
                s.planned_gb = event.data.get("planned_allocated_gb")
            elif event.kind == "sample":
                s.samples.extend({**sample, "step": event.step} for sample in event.data["samples"])
            if event.message:
                self._log.append(f"[{event.kind}] {event.message}")
            if event.kind in FINAL_KINDS:
                s.status = event.kind
                s.files = event.data.get("files", [])
                s.error = event.message if event.kind == "failed" else ""
