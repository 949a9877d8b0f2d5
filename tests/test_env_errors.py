"""A broken environment (output_dir in the way or read-only, a full disk, orphaned temp files, planted pickles, a bad
--set) is one clear message naming the path and the fix: exit code 2 on the CLI, a 'failed' job in the UI, no
traceback, and nothing half-written left as a result."""

import errno
import importlib.util
import io
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from studio import checkpoints
from studio.checkpoints import Position, load_checkpoint, save_checkpoint
from studio.config import config_from_dict
from studio.errors import StudioError
from studio.events import EventSink
from studio.fileio import atomic_path
from studio.jobs import JobRunner
from studio.loop import train
from studio.models.causal_lm import load_causal_lm

ROOT = Path(__file__).resolve().parent.parent
# What safetensors 0.8 raises on a full disk (seen on a full tmpfs).
DISK_FULL = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def cli(argv, capsys):
    """train.py's main in this process: (exit code, stderr); its Ctrl-C handler is put back afterwards."""
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_:
            module.main([str(a) for a in argv])
    finally:
        signal.signal(signal.SIGINT, handler)
    return exit_.value.code, capsys.readouterr().err


def llm_config(demo, out, **extra):
    return config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                             "output_dir": str(out), "sample_prompts": [], **extra})


class Planted:
    """What a malicious pickle holds: unpickling it would call os.makedirs (harmless here, and visible)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_output_dir_that_is_a_file_is_one_message_exit_2(demo, tmp_path, capsys):
    in_the_way = tmp_path / "run"
    in_the_way.write_text("not a folder")
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: demo-image\nbase_model: {demo.sd15}\ntrain_data_dir: {demo.images}\n"
                      f"output_dir: {in_the_way}\n")
    code, err = cli(["--config", config], capsys)
    assert code == 2 and "Traceback" not in err
    message = f"cannot create the folder {in_the_way}: {in_the_way} is a file. Choose another output_dir."
    assert err.strip() == f"error: {message}"  # once: the 'failed' event is not printed on top of it
    assert in_the_way.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_output_dir_fails_the_ui_job_with_one_message(demo, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        for out in (read_only / "run", read_only):  # a folder to create, an existing folder
            runner = JobRunner()
            runner.start(llm_config(demo, out))
            state = runner.wait(60)
            assert state.status == "failed"
            assert state.error == f"cannot write to {out} (Permission denied): choose another output_dir."
            assert "Traceback" not in "\n".join(state.log)
    finally:
        read_only.chmod(0o700)


def test_full_disk_during_a_save_names_the_disk_and_leaves_nothing_half_written(demo, tmp_path, monkeypatch):
    adapter, state = {"w": torch.ones(2)}, {"optimizer": {}}
    final = tmp_path / "out" / "checkpoints" / "step-000003"

    def full(*args, **kwargs):
        raise DISK_FULL

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_torch(obj, f, real_save=torch.save):  # torch's own save, onto a file that fails as on a full disk
        real_save(obj, FullDisk())

    for module, name, writer in ((checkpoints, "save_file", full), (torch, "save", full_torch)):
        with monkeypatch.context() as m:
            m.setattr(module, name, writer)
            with pytest.raises(StudioError, match=rf"^The disk holding {re.escape(str(final))} is full \([\d,]+ MB "
                               r"free\)\. Free some space and try again; a training run continues from its last "
                               r"checkpoint with resume_from: latest\.$"):
                save_checkpoint(tmp_path / "out", adapter, state, Position(step=3), keep=2)
        assert list(final.parent.iterdir()) == []  # neither the checkpoint nor its temporary folder

    target = tmp_path / "out" / "adapter.safetensors"
    with pytest.raises(StudioError, match=f"The disk holding {re.escape(str(target))} is full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoints"]

    # In a run: a 'failed' event with the message, no 'done' and no adapter presented.
    monkeypatch.setattr(checkpoints, "save_file", full)
    events = []
    with pytest.raises(StudioError, match="The disk holding"):
        train(llm_config(demo, tmp_path / "run", max_train_steps=1), EventSink([events.append]))
    assert events[-1].kind == "failed" and events[-1].message.startswith("The disk holding ")
    assert "traceback" not in events[-1].data and not any(e.kind == "done" for e in events)


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(demo, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-000002").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-000002" / "state.pt").write_bytes(b"half")
    orphans = [out / ".run.safetensors.k3_x9abz.tmp", out / ".config.yaml.abcdefgh.tmp"]
    kept = [out / "notes.tmp", out / ".run.safetensors.tmp", out / ".tmp-note", out / "checkpoints" / "my.tmp"]
    for path in orphans + kept:
        path.write_text("x")
    events = []
    train(llm_config(demo, out, max_train_steps=1), EventSink([events.append]))
    assert not any(p.exists() for p in orphans) and not (out / "checkpoints" / ".tmp-step-000002").exists()
    assert all(p.is_file() for p in kept)  # only the names our atomic writers make
    assert (f"Removed 3 unfinished file(s) an interrupted save left in {out}: .config.yaml.abcdefgh.tmp, "
            ".run.safetensors.k3_x9abz.tmp, checkpoints/.tmp-step-000002") in [e.message for e in events]


def test_planted_pickles_are_refused_without_running_them(demo, tmp_path):
    marker = tmp_path / "ran"
    step = tmp_path / "out" / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    save_file({"w": torch.ones(1)}, step / "adapter.safetensors")
    torch.save({"position": {"step": 1}, "planted": Planted(marker)}, step / "state.pt")
    with pytest.raises(StudioError) as refused:
        load_checkpoint(step)
    assert str(refused.value) == (
        f"resume_from: {step / 'state.pt'} holds more than the tensors and plain values Studio writes there (or it "
        "is damaged). Loading a pickle can run arbitrary code hidden in the file, so Studio refuses it.\n"
        "Resume from another checkpoint, or delete this one if you did not make it.")

    model = tmp_path / "llama"
    shutil.copytree(demo.llama, model)
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save({**weights, "planted": Planted(marker)}, model / "pytorch_model.bin")
    with pytest.raises(StudioError) as refused:
        load_causal_lm(str(model), dtype="auto", device=torch.device("cpu"))
    message = str(refused.value)
    assert message.startswith(f"base_model {model}: its pytorch_model.bin weights hold more than tensors (or are "
                              "damaged). Loading a pickle can run arbitrary code hidden in the file, so Studio "
                              "refuses it.\nBetter: use the model's .safetensors weights")
    assert f"r'{model / 'model.safetensors'}'" in message and "Traceback" not in message  # the converting command
    assert not marker.exists()


def test_bad_set_value_is_one_message_exit_2(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora_rank: 8\n")
    usage = ("Write --set key=value, the value in YAML syntax, e.g. --set lora_rank=16 'sample_prompts=[a cat, a dog]'"
             " (quote a value with ': ' in it: 'name=\"a: b\"').")
    code, err = cli(["--config", config, "--set", "lora_rank=[1,"], capsys)
    assert code == 2 and err.strip() == ("error: --set 'lora_rank=[1,': the value is not valid YAML (expected the "
                                         f"node content, but found '<stream end>'). {usage}")
    code, err = cli(["--config", config, "--set", "x: y: z"], capsys)
    assert code == 2 and err.strip() == f"error: --set 'x: y: z': it has no '='. {usage}"
