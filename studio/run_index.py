"""The workspace's index of runs and its job queue: one SQLite file, `workspace/studio.db`.

The run folders (workspace/runs/<name>: config.yaml, events.jsonl, adapters) stay the source of truth for outputs;
the index adds what a folder cannot say — the queue's order, the frozen config of a job not started yet, which process
runs a job — and makes the Runs table one query. Every change is one transaction (`BEGIN IMMEDIATE`: SQLite
serialises writers across processes), so the studio and a `train.py` in a terminal share it safely; a call that
finds another process writing waits a few seconds, then says the index is busy. Deleted, it is rebuilt from the run
folders on the next read; unreadable (damaged, truncated, not a database), it is moved aside as
`studio.db.corrupt-<time>` and rebuilt the same way, with one log line saying so.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from studio.errors import StudioError
from studio.events import Event
from studio.run_records import (COLUMNS, FINISHED, INTERRUPTED, QUEUED, RUNNING, RunRecord,  # noqa: F401 (re-exported)
                                apply_event, record_from_folder)
from studio.safe_names import workspace_path

log = logging.getLogger(__name__)

DB_NAME = "studio.db"
PROGRESS_WRITE_SECONDS = 2.0  # progress reaches the index at most this often: a step must not wait for a disk sync
BUSY_SECONDS = 8.0  # how long a call waits for another process's write (those take milliseconds) before giving up

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
    earlier_seconds REAL DEFAULT 0, -- training time of a resumed run's earlier sessions
    final_loss REAL,
    best_val_loss REAL,
    best_val_step INTEGER,
    adapter TEXT,
    adapter_bytes INTEGER,
    message TEXT DEFAULT ''
)"""



class RunIndex:
    def __init__(self, workspace_root: str | Path):
        self.root = Path(workspace_root)
        self.runs_dir = self.root / "runs"
        self.path = self.root / DB_NAME
        self._checked = False  # the file passed an integrity check in this process

    @classmethod
    def for_output_dir(cls, output_dir: str | Path) -> "RunIndex | None":
        """The index of the workspace a run folder belongs to (workspace/runs/<name>), or None for a folder elsewhere."""
        out = Path(output_dir).expanduser().resolve()
        return cls(out.parent.parent) if out.parent.name == "runs" else None

    def run_folder(self, name: str) -> Path:
        """The folder of the run called `name` (a name, never a path: studio.safe_names); it need not exist."""
        return workspace_path(self.root, "run", name)

    # --- connection ---------------------------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if not _unreadable(exc):
                raise StudioError(f"The run index {self.path} cannot be used ({exc}).") from None
            con.close()
            self._set_aside(exc)
            raise StudioError(f"The run index {self.path} was unreadable; it was rebuilt from the run folders. Try "
                              "again.") from None
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        """A connection inside `BEGIN IMMEDIATE`. While another process writes it retries for BUSY_SECONDS (saying
        so once); an unreadable file is set aside and rebuilt first."""
        self.root.mkdir(parents=True, exist_ok=True)
        deadline, said, set_aside = time.monotonic() + BUSY_SECONDS, False, False
        while True:
            con = None
            try:
                con = sqlite3.connect(self.path, timeout=0.5, isolation_level=None)
                con.row_factory = sqlite3.Row
                self._begin(con)
                return con
            except sqlite3.DatabaseError as exc:
                if con is not None:
                    con.close()
                if _unreadable(exc) and not set_aside:
                    self._set_aside(exc)
                    set_aside = True
                elif _unreadable(exc) or ("locked" not in str(exc) and "busy" not in str(exc)):
                    raise StudioError(f"The run index {self.path} cannot be used ({exc}).") from None
                elif time.monotonic() > deadline:
                    raise StudioError(f"The run index {self.path} is busy: another studio or train.py has been "
                                      f"writing to it for {BUSY_SECONDS:.0f} s. Try again in a moment; nothing was "
                                      "changed.") from None
                elif not said:
                    log.warning("The run index %s is busy (another process is writing to it); retrying.", self.path)
                    said = True

    def _begin(self, con: sqlite3.Connection) -> None:
        con.execute("PRAGMA journal_mode=WAL")  # readers never wait for the trainer's writes
        con.execute(_SCHEMA)
        if not self._checked:  # a truncated file opens fine and fails later, on the pages it lost
            problem = con.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {problem}")
        con.execute("BEGIN IMMEDIATE")
        if not self._checked:
            _add_new_columns(con)
            self._checked = True

    def _set_aside(self, exc: sqlite3.DatabaseError) -> None:
        """Move an unreadable index (and its WAL files) to studio.db.corrupt-<time>, and rebuild it from the run
        folders. The queue it held is lost; the runs are not."""
        aside = self.path.with_name(f"{DB_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            except FileNotFoundError:  # no such file, or another process moved it first
                pass
            except OSError as move_error:
                raise StudioError(f"The run index {self.path} cannot be read ({exc}) nor moved aside ({move_error}). "
                                  "Move it away yourself: it is rebuilt from the run folders (only the queue is "
                                  "lost).") from None
        self._checked = False
        self.sync()
        log.warning("The run index %s could not be read (%s): moved it to %s and rebuilt it from the run folders "
                    "(jobs that were queued must be queued again).", self.path, exc, aside.name)

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
    def enqueue(self, name: str, config_yaml: str | Callable[[str], str], *, family: str = "", task_type: str = "",
                front: bool = False, free_name: bool = False) -> str:
        """Queue a job with its frozen config; returns its name. `free_name`: the first name from `name` on that
        nobody has taken (`unique_name`), chosen in the same transaction as the insert, so adds from any number of
        studios never collide (`config_yaml` may then be a function of the name chosen); else exactly `name` (a run
        being resumed)."""
        with self._transaction() as con:
            name = self._unique(con, name) if free_name else name
            config_yaml = config_yaml(name) if callable(config_yaml) else config_yaml
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
        return name

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
        unknown = set(values) - set(COLUMNS)
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
        """Remove a run: exactly its folder and its record, once it is known to be a run of this workspace — a name
        in the index, a real folder under runs/ (not a link), not running. A queued job has no folder yet."""
        folder = self.run_folder(name)
        self.sync()  # a folder train.py made since the last look is a run too
        record = self.get(folder.name)
        if record is None:
            raise StudioError(f"There is no run called '{folder.name}' in {self.runs_dir}. Refresh the Runs table "
                              "and pick one from it.")
        if record.status == RUNNING and _alive(record.pid):
            raise StudioError(f"'{folder.name}' is running. Cancel it first, then delete it.")
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise StudioError(f"{folder} is a link or a file, not a run folder; the studio deletes only the run "
                              "folders it made. Remove it in your file manager.")
        if folder.is_dir():
            shutil.rmtree(folder)
        with self._transaction() as con:
            con.execute("DELETE FROM runs WHERE name = ?", (name,))

    # --- keeping the index true -----------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Add run folders the index lacks (read from their files), drop records of deleted folders, and mark runs
        whose training process died as interrupted."""
        folders = {p.name: p for p in self.runs_dir.iterdir() if not p.is_symlink() and (p / "config.yaml").is_file()} \
            if self.runs_dir.is_dir() else {}  # a link is not a run: its files are not the workspace's
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
                    try:
                        record = record_from_folder(folder)
                    except OSError as exc:  # unreadable files: not listed until they can be read, no crash
                        log.warning("Run folder %s cannot be read (%s); it is left out of the index.", folder, exc)
                        continue
                    con.execute(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                                [getattr(record, c) for c in COLUMNS])

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


def _add_new_columns(con: sqlite3.Connection) -> None:
    """Columns added since an index file was made (inside the write lock: two studios never add one twice)."""
    have = {row["name"] for row in con.execute("PRAGMA table_info(runs)")}
    for name, kind in (("earlier_seconds", "REAL DEFAULT 0"),):
        if name not in have:
            con.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")


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


def _unreadable(exc: sqlite3.DatabaseError) -> bool:
    """The file is damaged or not a database (rather than busy, or a mistake in a query)."""
    return type(exc) is sqlite3.DatabaseError or "malformed" in str(exc) or "not a database" in str(exc)
