"""The background job runner: one job at a time, stop at a step boundary, failures reported, not raised."""

import time

import pytest

from studio.config import config_from_dict
from studio.errors import StudioError
from studio.jobs import JobRunner


def demo_config(demo, out, **extra):
    return config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                             "output_dir": str(out), "sample_every_steps": 0, "sample_prompts": [], **extra})


def wait_for(predicate, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_one_job_at_a_time_and_cancel(demo, tmp_path):
    runner = JobRunner()
    runner.start(demo_config(demo, tmp_path / "a", max_train_steps=100_000, save_steps=0))
    with pytest.raises(StudioError, match="already running"):
        runner.start(demo_config(demo, tmp_path / "b"))
    assert wait_for(lambda: runner.snapshot().step >= 2)
    runner.stop()
    state = runner.wait(60)
    assert state.status == "stopped" and 2 <= state.step < 100_000
    assert (tmp_path / "a" / "checkpoints" / f"step-{state.step:06d}").is_dir()  # stopped within one step
    assert state.files and state.losses and any("Stopped" in line for line in state.log)


def test_completed_job_and_failure(demo, tmp_path):
    runner = JobRunner()
    runner.start(demo_config(demo, tmp_path / "ok", max_train_steps=3))
    state = runner.wait(60)
    assert state.status == "done" and state.step == state.total == 3 and state.files[0].endswith("ok.safetensors")
    (tmp_path / "bad").mkdir()
    runner.start(demo_config(demo, tmp_path / "out", train_data_dir=str(tmp_path / "bad")))
    state = runner.wait(60)
    assert state.status == "failed" and "holds no images" in state.error
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # output_dir cannot be created: reported as a 'failed' event all the same
    runner.start(demo_config(demo, blocked / "run"))
    state = runner.wait(timeout=120)
    assert state.status == "failed" and state.error == (
        f"cannot create the folder {blocked / 'run'}: a folder above {blocked / 'run'} is a file. Choose another "
        "output_dir.")
