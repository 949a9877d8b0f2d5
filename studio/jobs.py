"""The background trainer: one job at a time from a queue, stop, and a snapshot any page can poll.

The studio creates one `JobRunner` for the process — the GPU is one shared resource, so every browser tab sees the
same job, and reloading the page reattaches to it. With a `RunIndex` (the studio's), jobs come from the workspace's
persistent queue: `start` puts a job first and `enqueue` last; the worker thread runs them one after another until
the queue is empty, and a failed job does not stop it. Without one (scripts, tests), `start` runs one job.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from studio.config import RunConfig, config_from_dict, parse_yaml, to_yaml
from studio.errors import StudioError
from studio.events import FINAL_KINDS, Event, EventSink, read_events
from studio.run_index import INTERRUPTED, QUEUED, RunIndex, RunRecord, first_free_name


@dataclass
class JobState:
    status: str = "idle"  # idle, queued, running, stopping, done, stopped, failed, interrupted
    name: str = ""
    output_dir: str = ""
    step: int = 0
    total: int = 0
    it_per_s: float | None = None
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    error: str = ""
    planned_gb: float | None = None  # the memory plan's allocated peak
    peak_gb: float | None = None  # measured on CUDA: torch.cuda.max_memory_allocated so far

    @property
    def run(self) -> str:
        """The run's folder name: its name in the workspace's index."""
        return Path(self.output_dir).name


@dataclass
class _Job:
    cfg: RunConfig | None
    run: str
    output_dir: str
    fitted: object = None
    error: str = ""  # set when the frozen config no longer loads: the job fails with it


class JobRunner:
    LOG_LINES = 200

    def __init__(self, index: RunIndex | None = None):
        self.index = index
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._flags = {"sample": threading.Event(), "save": threading.Event()}  # Sample now / Save now
        self._job_cfg: RunConfig | None = None  # the training job's config
        self._state = JobState()
        self._log: deque[str] = deque(maxlen=self.LOG_LINES)
        self._direct: list[_Job] = []  # start() without an index
        self._fitted: dict[str, object] = {}  # run -> the fit that produced its config, for its plan report

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """A job is training (the worker may be between two queued jobs: that is not busy)."""
        return self.running and self._state.status in ("running", "stopping")

    def start(self, cfg: RunConfig, fitted=None) -> RunConfig:
        """Run `cfg` now (first in the queue); `fitted` (studio.plan.fit.Fitted) carries the fit's reasons and plan.
        Refused while a job trains. Returns the config as queued (under a free run name: see `_enqueue`)."""
        with self._lock:
            if self.busy:
                raise StudioError(f"A training job ({self._state.name}) is already running. Wait for it to "
                                  "finish, cancel it, or add this one to the queue.")
            if self.index:
                cfg = self._enqueue(cfg, fitted, front=True)
                self._fitted[Path(cfg.output_dir).name] = fitted
            else:
                self._direct.append(_Job(cfg, Path(cfg.output_dir).name, cfg.output_dir, fitted))
            self._state = JobState(status="running", name=cfg.name, output_dir=cfg.output_dir)
            self._log.clear()
            self._kick()
            return cfg

    def enqueue(self, cfg: RunConfig, fitted=None) -> RunConfig:
        """Add `cfg` to the end of the queue (its config frozen now); it runs when the jobs before it are done.
        Returns the config as queued (under a free run name: see `_enqueue`)."""
        if not self.index:
            raise StudioError("This runner has no queue (no workspace index).")
        with self._lock:
            cfg = self._enqueue(cfg, fitted, front=False)
            self._kick()
            return cfg

    def _enqueue(self, cfg: RunConfig, fitted, *, front: bool) -> RunConfig:
        """Queue `cfg`; a new run takes the first free name from its own on, chosen in the index's transaction
        (another studio may have taken the name since it was offered); a resumed run keeps its name."""
        family = fitted.family if fitted else cfg.model_family  # the fit resolved 'auto'
        out = Path(cfg.output_dir)
        name = self.index.enqueue(out.name, lambda free: to_yaml(replace(cfg, output_dir=str(out.with_name(free)))),
                                  family=family, task_type=cfg.task_type, front=front,
                                  free_name=not cfg.resume_from)
        return replace(cfg, output_dir=str(out.with_name(name))) if name != out.name else cfg

    def resume_queue(self) -> None:
        """Start working through jobs queued before the studio (re)started."""
        with self._lock:
            if self.index and self.index.queued():
                self._kick()

    def _kick(self) -> None:
        if not self.running:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._work, name="trainer", daemon=True)
            self._thread.start()

    def stop(self) -> bool:
        """Ask the training job to stop at the next step boundary (it saves a checkpoint first)."""
        with self._lock:
            if not self.busy:
                return False
            self._stop.set()
            self._state.status = "stopping"
            return True

    def request(self, what: str) -> bool:
        """Ask the training job for samples ('sample') or a checkpoint plus adapter ('save') after this update."""
        with self._lock:
            if not self.busy:
                return False
            if what == "sample" and self._job_cfg and not self._job_cfg.sample_prompts:
                raise StudioError("This run has no sample_prompts, so there is nothing to sample. Add some to the "
                                  "config for the next run.")
            self._flags[what].set()
            return True

    def wait(self, timeout: float | None = None) -> JobState:
        """Wait for the worker to finish every job (the queue to empty), then the last job's state."""
        thread = self._thread
        if thread:
            thread.join(timeout)
        return self.snapshot()

    def snapshot(self) -> JobState:
        """The current (or last) job's state."""
        with self._lock:
            return replace(self._state, losses=list(self._state.losses), val_losses=list(self._state.val_losses),
                           log=list(self._log), samples=list(self._state.samples), files=list(self._state.files))

    def state_of(self, run: str) -> JobState:
        """Run `run`'s own state: live if it is the current job, else from the index and its events.jsonl."""
        current = self.snapshot()
        if run and current.run == run and current.status in ("running", "stopping"):
            return current
        record = self.index.get(run) if self.index else None
        if record is None:
            return JobState()
        return state_from_record(record, self.index.run_folder(run))

    # --- the worker ---------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._next()) is not None:
            self._run(job)

    def _next(self) -> _Job | None:
        with self._lock:
            if self._direct:
                job = self._direct.pop(0)
            elif self.index and (record := self.index.claim_next(os.getpid())):
                job = _job_from_record(record, self.index, self._fitted.pop(record.name, None))
            else:
                self._thread = None  # under the lock: a start() from now on starts a new worker
                return None
            self._stop = threading.Event()
            self._flags = {"sample": threading.Event(), "save": threading.Event()}
            self._job_cfg = job.cfg
            self._state = JobState(status="running", name=job.cfg.name if job.cfg else job.run,
                                   output_dir=job.output_dir)
            self._log.clear()
            return job

    def _run(self, job: _Job) -> None:
        # Imported in the thread: torch loads off the UI's start-up path.
        from studio.distributed import launch_and_follow, needs_launch
        from studio.loop import Requests, train

        listeners = [self._on_event] + ([self.index.listener(job.run)] if self.index else [])
        sink = EventSink(listeners)
        try:
            if job.error:
                sink.emit("failed", message=job.error)
                return
            if needs_launch(job.cfg):  # several GPUs: a subprocess through accelerate, followed by its events
                launch_and_follow(job.cfg, sink, self._stop)
            else:
                train(job.cfg, sink, self._stop, fitted=job.fitted, requests=Requests(**self._flags))
        except Exception as exc:  # noqa: BLE001 - the loop reports its failures as a 'failed' event...
            with self._lock:  # ...this is the safety net for one that never got reported: never stay 'running'
                unreported = self._state.status not in FINAL_KINDS
            if unreported:
                sink.emit("failed", message=f"Training failed: {exc}")

    def _on_event(self, event: Event) -> None:
        with self._lock:
            apply_event(self._state, self._log, event)


def apply_event(state: JobState, log: deque[str] | list[str], event: Event) -> None:
    """What one training event changes in a job's state (live, or replayed from events.jsonl)."""
    state.step, state.total = event.step or state.step, event.total or state.total
    if event.kind == "progress":
        state.losses.append((event.step, event.data["loss"]))
        state.it_per_s, state.eta_s = event.data.get("it_per_s"), event.data.get("eta_s")
        state.peak_gb = event.data.get("peak_allocated_gb", state.peak_gb)
    elif event.kind == "validation":
        state.val_losses.append((event.step, event.data["loss"]))
    elif event.kind == "plan":
        state.planned_gb = event.data.get("planned_allocated_gb")
    elif event.kind == "sample":
        state.samples.extend({**sample, "step": event.step} for sample in event.data["samples"])
    if event.message:
        log.append(f"[{event.kind}] {event.message}")
    if event.kind in FINAL_KINDS:
        state.status = event.kind
        state.files = event.data.get("files", [])
        state.error = event.message if event.kind == "failed" else ""


def state_from_record(record: RunRecord, folder: Path) -> JobState:
    """A job that is not the current one, as the index and its event log tell it."""
    state = JobState(status=record.status, name=record.name, output_dir=str(folder), step=record.step,
                     total=record.total)
    log: deque[str] = deque(maxlen=JobRunner.LOG_LINES)
    if record.status != QUEUED:
        for event in read_events(folder / "events.jsonl"):
            apply_event(state, log, event)
    state.log, state.status = list(log), record.status  # the index knows 'interrupted'; events.jsonl cannot
    if record.status in ("failed", INTERRUPTED):
        state.error = state.error or record.message
    return state


def _job_from_record(record: RunRecord, index: RunIndex, fitted) -> _Job:
    """A queued job's frozen config, loaded again now: a path that vanished since is this job's failure."""
    output_dir = str(index.runs_dir / record.name)
    try:
        cfg = config_from_dict(parse_yaml(record.config, f"the queued config of '{record.name}'"))
    except StudioError as exc:
        return _Job(None, record.name, output_dir, error=str(exc))
    return _Job(cfg, record.name, cfg.output_dir, fitted)


def with_unique_name(index: RunIndex | None, cfg: RunConfig) -> tuple[RunConfig, str]:
    """`cfg` under a run name nobody has taken (`style-2`, `style-3`, ...), and a note saying so when it changed; a
    config resuming its own run keeps its name. Without an index (an output_dir outside a workspace) a folder that
    holds anything gives way to the first name nothing has: a finished run is never trained over."""
    out = Path(cfg.output_dir)
    if cfg.resume_from:
        return cfg, ""
    if index:
        free = index.unique_name(out.name)
    elif out.is_dir() and any(out.iterdir()):
        free = first_free_name(out.name, lambda name: out.with_name(name).exists())
    else:  # free, empty, or a file in the way (the loop says so)
        free = out.name
    if free == out.name:
        return cfg, ""
    return (replace(cfg, output_dir=str(out.with_name(free))),
            f"The run name '{out.name}' is taken, so this run is '{free}'.")
