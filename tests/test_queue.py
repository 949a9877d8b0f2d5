"""The job queue and the index of runs (workspace/studio.db): order, moves and unique names; two writers; the index
rebuilt from the run folders; a dead trainer marked interrupted and resumed; the studio's queue through its API,
across a restart; delete refusing a running job; several configs in one `train.py` call."""

import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from gradio_client import Client

from studio.config import config_from_dict, to_yaml
from studio.jobs import JobRunner
from studio.run_index import RunIndex
from studio.ui.app import build_app, launch
from studio.ui.runs_table import continue_run, resume_run

ROOT = Path(__file__).resolve().parent.parent
DEAD_PID = 2**22 + 12345  # above the kernel's pid_max default: never a live process


def workspace_with_data(demo, root: Path) -> Path:
    """A fresh workspace holding a copy of the demo images (studio runs read data from their workspace)."""
    shutil.copytree(demo.images, root / "datasets" / "shapes")
    (root / "datasets" / "empty").mkdir()
    return root


def run_values(demo, root: Path, name: str, **extra) -> dict:
    return {"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(root / "datasets" / "shapes"),
            "output_dir": str(root / "runs" / name), "max_train_steps": 2, "save_steps": 0, "sample_every_steps": 0,
            "sample_prompts": [], **extra}


def wait_until(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout}s")


def test_queue_order_moves_and_unique_names(tmp_path):
    index = RunIndex(tmp_path)
    for name in ("a", "b", "c"):
        index.enqueue(name, "task_type: image-generation\n")
    index.move("c", -2)
    index.move("a", +5)
    assert [r.name for r in index.queued()] == ["c", "b", "a"]
    index.enqueue("first", "{}\n", front=True)
    assert [r.name for r in index.queued()] == ["first", "c", "b", "a"]
    with pytest.raises(Exception, match="already queued"):
        index.enqueue("b", "{}\n")
    claimed = index.claim_next()
    assert claimed.name == "first" and claimed.status == "running" and claimed.pid == os.getpid()
    index.remove_queued("b")
    with pytest.raises(Exception, match="not in the queue"):
        index.remove_queued("first")  # running, not queued
    assert [r.name for r in index.queued()] == ["c", "a"]
    (tmp_path / "runs" / "style").mkdir(parents=True)
    (tmp_path / "runs" / "style-2").mkdir()
    assert [index.unique_name(n) for n in ("style", "style-2", "c", "new")] == ["style-3", "style-3", "c-2", "new"]


def _enqueue_many(root: str, prefix: str) -> None:
    index = RunIndex(root)
    for i in range(25):
        index.enqueue(f"{prefix}{i}", "{}\n")


def test_two_writers_never_corrupt_it(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_enqueue_many, args=(str(tmp_path), p)) for p in ("x", "y")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    queued = RunIndex(tmp_path).queued()
    assert len(queued) == 50 and len({r.queue_pos for r in queued}) == 50  # every job, each in its own place


def test_index_rebuilt_from_folders_interrupted_resumed_and_continued(demo, tmp_path):
    root = workspace_with_data(demo, tmp_path)
    index = RunIndex(root)
    runner = JobRunner(index)
    runner.start(config_from_dict(run_values(demo, root, "kept")))
    assert runner.wait(120).status == "done"
    before = index.get("kept")
    assert before.status == "done" and before.step == 2 and before.adapter_bytes > 0 and before.final_loss > 0

    (root / "studio.db").unlink()  # the folders are the source of truth: the index comes back from them
    rebuilt = {r.name: r for r in index.list()}["kept"]
    assert (rebuilt.status, rebuilt.step, rebuilt.total, rebuilt.adapter_bytes) == ("done", 2, 2, before.adapter_bytes)
    assert rebuilt.final_loss == pytest.approx(before.final_loss)

    index.update("kept", status="running", pid=DEAD_PID)  # its trainer died without a word
    assert index.list()[0].status == "interrupted"
    state = runner.state_of("kept")
    assert state.status == "interrupted" and "Resume it" in state.error

    class Studio:  # what the Runs table's actions need of the studio
        jobs, workspace = runner, None
    Studio.index = index
    assert resume_run(Studio, "kept").startswith("✔")
    assert runner.wait(120).status == "done" and index.get("kept").status == "done"
    assert continue_run(Studio, "kept", 3).startswith("✔")
    state = runner.wait(120)
    assert state.status == "done" and state.step == 5 and index.get("kept").step == 5
    assert index.get("kept").earlier_seconds > 0  # the Runs table's duration counts the sessions before, too
    assert any("Resumed from" in line for line in state.log)


@pytest.fixture
def studio_app(demo, tmp_path, free_port):
    """Start (and restart) the studio over one fresh workspace; yields a function returning (client, studio)."""
    root = workspace_with_data(demo, tmp_path / "ws")
    opened = []

    def start():
        blocks, studio = build_app(root, with_demo=False)
        _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
        opened.append((blocks, studio))
        return Client(url, verbose=False), studio

    yield start, root
    for blocks, studio in opened:
        studio.jobs.stop()
        studio.jobs.wait(60)
        blocks.close()


def test_studio_queue_three_jobs_second_fails_then_restart(demo, studio_app):
    start, root = studio_app
    client, studio = start()
    values = [run_values(demo, root, "q1", max_train_steps=3),
              run_values(demo, root, "q2", train_data_dir=str(root / "datasets" / "empty")),  # fails at its start
              run_values(demo, root, "q3")]
    added = [client.predict(yaml.safe_dump(v), api_name="/queue_add") for v in values]
    assert [a["name"] for a in added] == ["q1", "q2", "q3"]
    wait_until(lambda: not client.predict(api_name="/queue_list") and not studio.jobs.running)
    runs = {r["name"]: r for r in client.predict(api_name="/runs_list")}
    assert [runs[n]["status"] for n in ("q1", "q2", "q3")] == ["done", "failed", "done"]
    assert "holds no images" in runs["q2"]["message"]
    assert runs["q1"]["started"] < runs["q2"]["started"] < runs["q3"]["started"]  # in order
    failed = client.predict("q2", api_name="/training_status")
    assert failed["status"] == "failed" and "holds no images" in failed["error"]
    renamed = client.predict(yaml.safe_dump(values[0]), api_name="/queue_add")
    assert renamed["name"] == "q1-2" and "is taken" in renamed["message"]
    wait_until(lambda: not studio.jobs.running)

    # A job queued while nothing works the queue (the studio is down), and one whose trainer died: after a restart
    # the first runs and the second is interrupted.
    blocked = JobRunner(RunIndex(root))  # only the index: its worker never starts
    blocked.index.enqueue("later", to_yaml(config_from_dict(run_values(demo, root, "later"))))
    blocked.index.update("q3", status="running", pid=DEAD_PID)
    client, studio = start()
    wait_until(lambda: studio.index.get("later").status == "done")
    assert studio.index.get("q3").status == "interrupted"


def test_delete_refuses_a_running_job(demo, studio_app):
    start, root = studio_app
    client, studio = start()
    client.predict(yaml.safe_dump(run_values(demo, root, "long", max_train_steps=100_000)), api_name="/queue_add")
    wait_until(lambda: client.predict("long", api_name="/training_status")["step"] >= 1)
    with pytest.raises(Exception, match="is running. Cancel it first"):
        client.predict("long", api_name="/delete_run")
    studio.jobs.stop()
    wait_until(lambda: studio.index.get("long").status == "stopped")
    assert client.predict("long", api_name="/delete_run") == "Deleted 'long'."
    assert not (root / "runs" / "long").exists() and studio.index.get("long") is None


@pytest.mark.slow
def test_cli_runs_several_configs_past_a_failure(demo, tmp_path):
    root = workspace_with_data(demo, tmp_path)
    configs = []
    for name, extra in (("one", {}), ("bad", {"train_data_dir": str(root / "datasets" / "missing")}), ("two", {})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run_values(demo, root, name, **extra)))
        configs += ["--config", str(path)]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *configs], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr  # a failure, and it was a config mistake
    summary = result.stdout.split("Summary:")[1].splitlines()
    assert [line.split()[0] for line in summary if line.strip()] == ["done", "failed", "done"]
    assert "train_data_dir" in result.stderr
    assert {r.name: r.status for r in RunIndex(root).list()} == {"one": "done", "two": "done"}  # the studio sees them
