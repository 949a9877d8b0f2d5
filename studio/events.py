"""Training events: the only wire between the trainer and whoever watches it (CLI, UI, tests).

The trainer calls `EventSink.emit(...)`; listeners get an `Event`, and every event is also appended to
`output_dir/events.jsonl` so a UI can reattach to (or read back) a run. A listener that raises is logged and
dropped for that event: watching a run can never break it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# kinds: plan, start, progress, validation, log, sample, checkpoint, backoff, done, stopped, failed
FINAL_KINDS = ("done", "stopped", "failed")


@dataclass
class Event:
    kind: str
    step: int = 0
    total: int = 0
    message: str = ""
    data: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)


Listener = Callable[[Event], None]


class EventSink:
    def __init__(self, listeners: list[Listener] | None = None):
        self.listeners = list(listeners or [])
        self._jsonl = None
        self._lock = threading.Lock()

    def open_jsonl(self, path: str | Path) -> None:
        """Also append every event to `path` (kept open: a step must not pay for reopening a file)."""
        self.close_jsonl()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: readable while running

    def close_jsonl(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None

    def emit(self, kind: str, step: int = 0, total: int = 0, message: str = "", **data) -> Event:
        event = Event(kind, step, total, message, data)
        with self._lock:
            if self._jsonl:
                try:
                    self._jsonl.write(event.to_json() + "\n")
                except OSError:
                    log.exception("could not append to the event log")
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:  # noqa: BLE001 - a broken listener must not stop training
                    log.exception("event listener failed on %s", kind)
        return event


def read_events(path: str | Path) -> list[Event]:
    """Events written by a run (skips a torn last line from a crash)."""
    path = Path(path)
    return parse_events(path.read_text(encoding="utf-8")) if path.is_file() else []


def parse_events(text: str) -> list[Event]:
    """The events in lines of an events.jsonl; a torn or foreign line is skipped."""
    events = []
    for line in text.splitlines():
        try:
            events.append(Event(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return events
