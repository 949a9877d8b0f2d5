"""A run's record in the workspace's index (studio.run_index), and how it is read back from the run's folder alone:
its config.yaml, its events.jsonl and its adapter's header — what the index is rebuilt from when it is lost."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, fields
from pathlib import Path

from studio.errors import StudioError
from studio.events import Event, read_events

QUEUED, RUNNING, INTERRUPTED = "queued", "running", "interrupted"
FINISHED = ("done", "stopped", "failed")


@dataclass
class RunRecord:
    name: str
    status: str
    config: str
    queue_pos: int | None = None
    pid: int | None = None
    family: str = ""
    task_type: str = ""
    step: int = 0
    total: int = 0
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    earlier_seconds: float = 0.0  # training time of a resumed run's earlier sessions
    final_loss: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    adapter: str | None = None
    adapter_bytes: int | None = None
    message: str = ""

    @property
    def seconds(self) -> float | None:
        """Training time: the earlier sessions' and this one's (a run resumed or continued counts them all)."""
        if self.started is None:
            return None
        return (self.earlier_seconds or 0.0) + (self.finished or time.time()) - self.started


COLUMNS = [f.name for f in fields(RunRecord)]


def apply_event(values: dict, event: Event, best: tuple[float, int] | None) -> dict:
    """The record fields an event changes (`best`: the best validation loss so far and its step)."""
    if event.step or event.total:
        values.update(step=event.step, total=event.total)
    if event.kind == "start":
        values.update(status=RUNNING, earlier_seconds=float(event.data.get("earlier_seconds") or 0.0))
    elif event.kind == "progress":
        values["final_loss"] = event.data.get("loss")
    elif event.kind == "plan" and event.data.get("family"):
        values["family"] = str(event.data["family"])
    elif event.kind == "validation" and (best is None or event.data["loss"] < best[0]):
        values.update(best_val_loss=event.data["loss"], best_val_step=event.step)
    elif event.kind in FINISHED:
        files = [Path(f) for f in event.data.get("files", [])]
        adapter = files[0] if files else None
        values.update(status=event.kind, finished=event.time, pid=None,
                      message=event.message if event.kind == "failed" else "",
                      adapter=str(adapter) if adapter else None, adapter_bytes=_size(adapter) if adapter else None)
    return values


def record_from_folder(folder: Path) -> RunRecord:
    """A run's record rebuilt from its folder: config.yaml, events.jsonl (no final event: interrupted) and the
    adapter's header; every column the files can tell is filled."""
    text = (folder / "config.yaml").read_text(encoding="utf-8", errors="replace")
    data = _config_values(text)
    events = read_events(folder / "events.jsonl")
    values: dict = {"status": INTERRUPTED}
    best = None
    for event in events:
        apply_event(values, event, best)
        if "best_val_loss" in values:
            best = (values["best_val_loss"], values["best_val_step"])
    task_type = str(data.get("task_type") or "")
    values["family"] = run_family(data, values.get("family", ""), values.get("adapter"), task_type)
    starts = [e.time for e in events if e.kind == "start"]  # the last session's: earlier ones are earlier_seconds
    record = RunRecord(name=folder.name, config=text, task_type=task_type,
                       created=events[0].time if events else folder.stat().st_mtime,
                       started=(starts[-1] if len(starts) > 1 else events[0].time) if events else None, **values)
    if record.status in (INTERRUPTED, RUNNING):
        record.status = INTERRUPTED
        record.message = record.message or "No process is training it. Resume it to continue from its last checkpoint."
    return record


def run_family(config: dict, from_events: str, adapter: str | None, task_type: str) -> str:
    """The family a finished run trained, from what its folder says, most direct first: the config's model_family
    (unless 'auto'), the plan event's resolved family, the adapter header's ModelSpec architecture, the task."""
    from studio.families import AUTO, all_families  # the registry: only when a record is rebuilt

    named = str(config.get("model_family") or "")
    if named and named != AUTO:
        return named
    if from_events:
        return from_events
    header = _adapter_metadata(Path(adapter)) if adapter else {}
    architecture = header.get("modelspec.architecture", "").split("/")[0]
    by_header = [f.name for f in all_families() if architecture and f.modelspec_architecture == architecture]
    of_task = [f.name for f in all_families() if f.task == task_type]  # a task with one family: the LLM
    if by_header:
        return by_header[0]
    return of_task[0] if len(of_task) == 1 else named


def _config_values(text: str) -> dict:
    from studio.config import parse_yaml  # the config module loads the family registry: not needed for the queue
    try:
        data = parse_yaml(text, "config.yaml")
    except StudioError:  # a damaged config.yaml: the record keeps its text, the rest comes from the events
        return {}
    return data if isinstance(data, dict) else {}


def _adapter_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file's JSON header (no tensor is read); {} for anything else."""
    try:
        with path.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(min(size, 100_000_000)))
    except (OSError, ValueError, struct.error):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None
