"""The run index heals itself: an unreadable studio.db is set aside and rebuilt from the run folders (the studio
starts, with one log line), the rebuild restores each run's family, adds from several processes each get a free
name, and a lock held by another process is a short wait, then a 'busy' message — never advice to delete it."""

import json
import logging
import multiprocessing
import sqlite3
import struct
import threading
from pathlib import Path

import pytest
from queue_adders import add_many

from studio import run_index
from studio.errors import StudioError
from studio.events import Event
from studio.run_index import RunIndex
from studio.ui.app import build_app


def make_run(root: Path, name: str, config: str, events: list[dict] = (), adapter_header: dict | None = None) -> Path:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config, encoding="utf-8")
    final = []
    if adapter_header is not None:
        adapter = folder / f"{name}.safetensors"
        header = json.dumps({"__metadata__": adapter_header}).encode()
        adapter.write_bytes(struct.pack("<Q", len(header)) + header)
        final = [{"kind": "done", "time": 20.0, "step": 2, "total": 2, "data": {"files": [str(adapter)]}}]
    lines = [{"kind": "start", "time": 10.0, "step": 0, "total": 2}, *events, *final]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    return folder


@pytest.fixture
def workspace(tmp_path):
    make_run(tmp_path, "named", "task_type: image-generation\nmodel_family: sdxl\n")
    make_run(tmp_path, "planned", "task_type: image-generation\nmodel_family: auto\n",
             events=[{"kind": "plan", "time": 11.0, "message": "Memory plan", "data": {"family": "sd15"}}])
    make_run(tmp_path, "exported", "task_type: image-generation\n",
             adapter_header={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    make_run(tmp_path, "chat", "task_type: text-generation\nmodel_family: auto\n")
    return tmp_path


def families(root: Path) -> dict[str, str]:
    return {r.name: r.family for r in RunIndex(root).list()}


def test_rebuild_restores_each_runs_family(workspace):
    expected = {"named": "sdxl", "planned": "sd15", "exported": "sdxl", "chat": "llm"}
    assert families(workspace) == expected
    (workspace / "studio.db").unlink()
    assert families(workspace) == expected  # not 'auto': from config, plan event, adapter header, task
    assert RunIndex(workspace).get("exported").status == "done"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_index_is_set_aside_and_rebuilt_at_start(workspace, damage, caplog):
    index = RunIndex(workspace)
    for i in range(150):  # pages enough that a truncated file loses rows
        index.enqueue(f"job{i}", "note: " + "x" * 400 + "\n")
    db = workspace / "studio.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database " * 100)
    else:
        with db.open("r+b") as f:
            f.truncate(db.stat().st_size // 2)
    damaged = db.read_bytes()
    with caplog.at_level(logging.WARNING, logger="studio.run_index"):
        _, studio = build_app(workspace, with_demo=False)  # the studio starts
    assert sorted(r.name for r in studio.index.list()) == ["chat", "exported", "named", "planned"]
    aside = list(workspace.glob("studio.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept for a look, not deleted
    lines = [r.getMessage() for r in caplog.records if r.name == "studio.run_index"]
    assert len(lines) == 1 and "rebuilt it from the run folders" in lines[0] and aside[0].name in lines[0]
    assert families(workspace)["planned"] == "sd15"


def test_concurrent_adds_from_two_processes_each_get_a_free_name(tmp_path):
    (tmp_path / "runs" / "style").mkdir(parents=True)  # the name is taken by a folder, too
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    adders = [context.Process(target=add_many, args=(str(tmp_path), results)) for _ in range(2)]
    for adder in adders:
        adder.start()
    names = results.get(timeout=120) + results.get(timeout=120)
    for adder in adders:
        adder.join(60)
    assert [a.exitcode for a in adders] == [0, 0]
    assert len(set(names)) == 40 and "style" not in names  # none refused, none shared
    queued = RunIndex(tmp_path).queued()
    assert len(queued) == 40 and all(r.config == f"output_dir: runs/{r.name}\n" for r in queued)


def test_a_held_lock_is_a_short_wait_then_busy(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(run_index, "BUSY_SECONDS", 1.0)
    index = RunIndex(tmp_path)
    index.enqueue("first", "{}\n")
    holder = sqlite3.connect(tmp_path / "studio.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process writing (SQLite locks per connection)
    with caplog.at_level(logging.WARNING, logger="studio.run_index"):
        with pytest.raises(StudioError, match="is busy") as refused:
            index.enqueue("second", "{}\n")
    assert "delete" not in str(refused.value).lower()
    assert [r.getMessage() for r in caplog.records if "busy" in r.getMessage()][0].endswith("retrying.")
    threading.Timer(0.3, lambda: holder.execute("ROLLBACK")).start()  # the writer finishes: the call goes through
    index.enqueue("second", "{}\n")
    holder.close()
    assert [r.name for r in index.queued()] == ["first", "second"]


def test_a_resumed_runs_duration_is_the_sum_of_its_sessions(tmp_path):
    """Session one trained 10 s; the resume's start event says so, and the Runs table's duration adds the 5 s of
    session two — live (the listener) and rebuilt from the folder — not the last session alone, nor the gap."""
    resumed = [{"kind": "done", "time": 20.0, "step": 2, "total": 2},
               {"kind": "start", "time": 100.0, "step": 2, "total": 4, "data": {"earlier_seconds": 10.0}},
               {"kind": "done", "time": 105.0, "step": 4, "total": 4}]
    make_run(tmp_path, "resumed", "task_type: image-generation\n", events=resumed)
    assert RunIndex(tmp_path).get("resumed") is None and RunIndex(tmp_path).list()[0].seconds == pytest.approx(15.0)
    index = RunIndex(tmp_path)
    index.record_start("live", "{}\n")
    listen = index.listener("live")
    listen(Event("start", step=2, total=4, data={"earlier_seconds": 10.0}))
    listen(Event("done", step=4, total=4, time=index.get("live").started + 5.0))
    assert index.get("live").seconds == pytest.approx(15.0)


def test_an_index_made_before_a_column_existed_gains_it(tmp_path):
    make_run(tmp_path, "old", "task_type: image-generation\n")
    old = sqlite3.connect(tmp_path / "studio.db")
    old.execute(run_index._SCHEMA.replace("earlier_seconds REAL DEFAULT 0,", ""))
    old.execute("INSERT INTO runs (name, status, config, started, finished) VALUES ('old', 'done', '', 1.0, 4.0)")
    old.commit()
    old.close()
    make_run(tmp_path, "new", "task_type: image-generation\n", adapter_header={})  # rebuilt into the new column
    assert {r.name: r.seconds for r in RunIndex(tmp_path).list()} == {"old": 3.0, "new": 10.0}
