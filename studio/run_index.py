"""The workspace's index of runs and its job queue: one SQLite file, `workspace/studio.db`.

The run folders (workspace/runs/<name>: config.yaml, events.jsonl, adapters) stay the source of truth for outputs;
the index adds what a folder cannot say — the queue's order, the frozen config of a job not started yet, which process
runs a job — and makes the Runs table one query. Every change is one transaction (`BEGIN IMMEDIATE`: SQLite
serialises writers across processes), so the studio and a `train.py` in a terminal share it safely. Deleted, it is
rebuilt from the run folders on the next read.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

from studio.errors import StudioError
from studio.events import Event, read_events

QUEUED, RUNNING, INTERRUPTED = "queued", "running", "interrupted"
FINISHED = ("done", "stopped", "failed")
DB_NAME = "studio.db"
PROGRESS_WRITE_SECONDS = 2.0  # progress reaches the index at most this often: a step must not wait for a disk sync

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,          -- the folder under workspace/runs
    status TEXT NOT NULL,           -- queued, running, done, stopped, failed, interrupted
    config TEXT NOT NULL,           -- the YAML, frozen when queued
    queue_pos INTEGER,              -- order among queued jobs
    pid INTEGER,                    -- the process training it, while running
    family TEXT DEFAULT '',
    task_type TEXT DEFAULT '',
    step INTEGER DEFAULT 0,
    total INTEGER DEFAULT 0,
    created REAL,
    started REAL,
    finished REAL,
    final_loss REAL,
    best_val_loss REAL,
    best_val_step INTEGER,
    adapter TEXT,
    adapter_bytes INTEGER,
    message TEXT DEFAULT ''
)"""


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
    final_loss: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    adapter: str | None = None
    adapter_bytes: int | None = None
    message: str = ""

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


_COLUMNS = [f.name for f in fields(RunRecord)]


class RunIndex:
    def __init__(self, workspace_root: str | Path):
        self.root = Path(workspace_root)
        self.runs_dir = self.root / "runs"
        self.path = self.root / DB_NAME

    @classmethod
    def for_output_dir(cls, output_dir: str | Path) -> "RunIndex | None":
        """The index of the workspace a run folder belongs to (workspace/runs/<name>), or None for a folder elsewhere."""
        out = Path(output_dir).expanduser().resolve()
        return cls(out.parent.parent) if out.parent.name == "runs" else None

    # --- connection ---------------------------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA journal_mode=WAL")  # readers never wait for the trainer's writes
            con.execute(_SCHEMA)
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StudioError(f"The run index {self.path} cannot be used ({exc}). Close other studios using this "
                              "workspace, or delete the file: it is rebuilt from the run folders.") from None
        finally:
            con.close()

    # --- names --------------------------------------------------------------------------------------------------------
    def unique_name(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`, ... : the first not taken by a run folder or a queued job."""
        with self._transaction() as con:
            return self._unique(con, name)

    def _unique(self, con: sqlite3.Connection, name: str) -> str:
        taken = {row["name"] for row in con.execute("SELECT name FROM runs")}
        taken |= {p.name for p in self.runs_dir.iterdir()} if self.runs_dir.is_dir() else set()
        return first_free_name(name, taken.__contains__)

    # --- the queue ----------------------------------------------------------------------------------------------------
    def enqueue(self, name: str, config_yaml: str, *, family: str = "", task_type: str = "",
                front: bool = False) -> None:
        """Queue a job under `name` (a free name: see `unique_name`, or a run being resumed) with its frozen config."""
        with self._transaction() as con:
            row = con.execute("SELECT status FROM runs WHERE name = ?", (name,)).fetchone()
            if row and row["status"] in (QUEUED, RUNNING):
                raise StudioError(f"'{name}' is already {row['status']}. Wait for it, or remove it from the queue.")
            edge = con.execute(f"SELECT {'MIN' if front else 'MAX'}(queue_pos) FROM runs WHERE status = ?",
                               (QUEUED,)).fetchone()[0]
            pos = 0 if edge is None else edge + (-1 if front else 1)
            con.execute("DELETE FROM runs WHERE name = ?", (name,))  # a resumed run starts a new record
            con.execute("INSERT INTO runs (name, status, config, queue_pos, family, task_type, created) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, QUEUED, config_yaml, pos, family, task_type,
                                                         time.time()))

    def claim_next(self, pid: int | None = None) -> RunRecord | None:
        """The first queued job, now marked running by process `pid` (atomic: two studios never take the same one)."""
        with self._transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE status = ? ORDER BY queue_pos LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            con.execute("UPDATE runs SET status = ?, queue_pos = NULL, pid = ?, started = ?, message = '' "
                        "WHERE name = ?", (RUNNING, pid or os.getpid(), time.time(), row["name"]))
        return self.get(row["name"])

    def queued(self) -> list[RunRecord]:
        return [r for r in self.list() if r.status == QUEUED]

    def remove_queued(self, name: str) -> None:
        with self._transaction() as con:
            deleted = con.execute("DELETE FROM runs WHERE name = ? AND status = ?", (name, QUEUED)).rowcount
        if not deleted:
            raise StudioError(f"'{name}' is not in the queue (it may have started already). Refresh the list.")

    def move(self, name: str, offset: int) -> None:
        """Move a queued job `offset` places (negative: earlier)."""
        with self._transaction() as con:
            order = [row["name"] for row in con.execute("SELECT name FROM runs WHERE status = ? ORDER BY queue_pos",
                                                        (QUEUED,))]
            if name not in order:
                raise StudioError(f"'{name}' is not in the queue (it may have started already). Refresh the list.")
            old = order.index(name)
            order.remove(name)
            order.insert(min(max(old + offset, 0), len(order)), name)
            con.executemany("UPDATE runs SET queue_pos = ? WHERE name = ?", list(enumerate(order)))

    # --- runs ---------------------------------------------------------------------------------------------------------
    def record_start(self, name: str, config_yaml: str, *, family: str = "", task_type: str = "") -> None:
        """A run started outside the queue (train.py): running, by this process."""
        with self._transaction() as con:
            con.execute("DELETE FROM runs WHERE name = ?", (name,))
            con.execute("INSERT INTO runs (name, status, config, pid, family, task_type, created, started) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (name, RUNNING, config_yaml, os.getpid(), family,
                                                            task_type, time.time(), time.time()))

    def update(self, name: str, **values) -> None:
        unknown = set(values) - set(_COLUMNS)
        assert not unknown, unknown
        with self._transaction() as con:
            con.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE name = ?",
                        (*values.values(), name))

    def get(self, name: str) -> RunRecord | None:
        with self._transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
        return RunRecord(**dict(row)) if row else None

    def list(self) -> list[RunRecord]:
        """Every run, newest first, queued jobs first in queue order; folders the index lacks are added from their
        files, and a 'running' run whose process is gone is marked interrupted."""
        self.sync()
        with self._transaction() as con:
            rows = con.execute("SELECT * FROM runs ORDER BY status != ?, queue_pos, COALESCE(started, created) DESC",
                               (QUEUED,)).fetchall()
        return [RunRecord(**dict(row)) for row in rows]

    def delete(self, name: str) -> None:
        """Remove a run: its folder and its record. Refuses a running one."""
        record = self.get(name)
        if record and record.status == RUNNING and _alive(record.pid):
            raise StudioError(f"'{name}' is running. Cancel it first, then delete it.")
        folder = self.runs_dir / name
        if folder.is_dir():
            shutil.rmtree(folder)
        with self._transaction() as con:
            con.execute("DELETE FROM runs WHERE name = ?", (name,))

    # --- keeping the index true -----------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Add run folders the index lacks (read from their files), drop records of deleted folders, and mark runs
        whose training process died as interrupted."""
        folders = {p.name: p for p in self.runs_dir.iterdir() if (p / "config.yaml").is_file()} \
            if self.runs_dir.is_dir() else {}
        with self._transaction() as con:
            known = {row["name"]: row for row in con.execute("SELECT name, status, pid FROM runs")}
            for name, row in known.items():
                if row["status"] == RUNNING and not _alive(row["pid"]):
                    con.execute("UPDATE runs SET status = ?, pid = NULL, message = ? WHERE name = ?",
                                (INTERRUPTED, "The process training it ended before the run did. Resume it to "
                                 "continue from its last checkpoint.", name))
                elif row["status"] in ("done", "stopped", INTERRUPTED) and name not in folders:  # deleted by hand
                    con.execute("DELETE FROM runs WHERE name = ?", (name,))
            for name, folder in folders.items():
                if name not in known:
                    record = record_from_folder(folder)
                    con.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                                [getattr(record, c) for c in _COLUMNS])

    def listener(self, name: str):
        """An event listener keeping `name`'s record up to date (progress written at most every
        PROGRESS_WRITE_SECONDS; what it held back goes with the next write)."""
        last_write = 0.0
        pending: dict = {}
        best: tuple[float, int] | None = None

        def listen(event: Event) -> None:
            nonlocal last_write, best
            apply_event(pending, event, best)
            if "best_val_loss" in pending:
                best = (pending["best_val_loss"], pending["best_val_step"])
            if not pending or (event.kind == "progress" and time.time() - last_write < PROGRESS_WRITE_SECONDS):
                return
            last_write = time.time()
            self.update(name, **pending)
            pending.clear()

        return listen


def first_free_name(name: str, taken: Callable[[str], bool]) -> str:
    """`name`, or `name-2`, `name-3`, ... : the first for which `taken` says no (`style-2` taken gives `style-3`)."""
    if not taken(name):
        return name
    stem, _, number = name.rpartition("-")
    base = stem if stem and number.isdigit() else name
    return next(f"{base}-{i}" for i in range(2, 100_000) if not taken(f"{base}-{i}"))


def apply_event(values: dict, event: Event, best: tuple[float, int] | None) -> dict:
    """The record fields an event changes (`best`: the best validation loss so far and its step)."""
    if event.step or event.total:
        values.update(step=event.step, total=event.total)
    if event.kind == "start":
        values.update(status=RUNNING)
    elif event.kind == "progress":
        values["final_loss"] = event.data.get("loss")
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
    """A run's record rebuilt from its folder: config.yaml and events.jsonl (no final event: interrupted)."""
    from studio.config import parse_yaml  # the config module loads the family registry: not needed for the queue

    text = (folder / "config.yaml").read_text(encoding="utf-8")
    data = parse_yaml(text, str(folder / "config.yaml"))
    events = read_events(folder / "events.jsonl")
    values: dict = {"status": INTERRUPTED}
    best = None
    for event in events:
        apply_event(values, event, best)
        if "best_val_loss" in values:
            best = (values["best_val_loss"], values["best_val_step"])
    record = RunRecord(name=folder.name, config=text, family=str(data.get("model_family") or ""),
                       task_type=str(data.get("task_type") or ""),
                       created=events[0].time if events else folder.stat().st_mtime,
                       started=events[0].time if events else None, **values)
    if record.status in (INTERRUPTED, RUNNING):
        record.status = INTERRUPTED
        record.message = record.message or "No process is training it. Resume it to continue from its last checkpoint."
    return record


def _size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
