"""train.py: the same run as the UI, from a YAML file; user mistakes print one message, no traceback."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # a subprocess CLI run
def test_train_from_yaml_and_reproduce_from_saved_config(demo, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"preset: demo-image\nbase_model: {demo.sd15}\ntrain_data_dir: {demo.images}\n"
                   f"output_dir: {tmp_path / 'out'}\nmax_train_steps: 4\nsample_prompts: []\n")
    first = run("--config", str(cfg))
    assert first.returncode == 0, first.stderr
    # Fitted at start on the CLI too: precision 'auto' resolved (fp32 on the CPU), each key with its reason.
    assert "Fitted to the CPU" in first.stderr and "mixed_precision = no:" in first.stderr
    assert "mixed_precision: 'no'" in (tmp_path / "out" / "config.yaml").read_text()
    assert f"Adapter: {tmp_path / 'out' / 'out.safetensors'}" in first.stdout
    again = run("--config", str(tmp_path / "out" / "config.yaml"), "--set", f"output_dir={tmp_path / 'again'}",
                cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "again.safetensors").is_file()  # the file is named after output_dir


def test_config_error_is_one_message_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora_rnak: 8\nbase_model: x\ntrain_data_dir: .\noutput_dir: o\n")
    result = run("--config", str(cfg))
    assert result.returncode == 2
    assert "Did you mean 'lora_rank'?" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_config_keys():
    result = run("--help")
    assert result.returncode == 0 and "lora_rank" in result.stdout and "One of: auto, no, fp16, bf16." in result.stdout


@pytest.mark.slow  # a subprocess CLI run
def test_ctrl_c_stops_at_a_step_and_keeps_a_checkpoint(demo, tmp_path):
    import signal
    import time

    cfg = tmp_path / "long.yaml"
    cfg.write_text(f"preset: demo-image\nbase_model: {demo.sd15}\ntrain_data_dir: {demo.images}\n"
                   f"output_dir: {tmp_path / 'out'}\nmax_train_steps: 100000\nsave_steps: 0\nsample_prompts: []\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "out" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and '"progress"' not in (events.read_text() if events.is_file() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Stopped: step" in out and (tmp_path / "out" / "out.safetensors").is_file()
    assert list((tmp_path / "out" / "checkpoints").glob("step-*"))


def test_known_library_noise_is_not_printed():
    """transformers' torchvision fallback note (torchvision stays off CPU installs on purpose) is not shown."""
    code = ("from studio.cli import configure_environment; configure_environment()\n"
            "from transformers import CLIPImageProcessor\nCLIPImageProcessor()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "torchvision" not in done.stderr, done.stderr


@pytest.mark.slow  # three subprocess CLI runs
def test_a_finished_run_is_never_trained_over(demo, tmp_path):
    """The config of a finished run, run again, trains beside it (`out-2`); resume_from=latest continues it."""
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"preset: demo-image\nbase_model: {demo.sd15}\ntrain_data_dir: {demo.images}\n"
                   f"output_dir: {tmp_path / 'out'}\nmax_train_steps: 4\nsave_steps: 4\nsample_prompts: []\n")
    assert run("--config", str(cfg)).returncode == 0
    adapter = tmp_path / "out" / "out.safetensors"
    before = adapter.read_bytes(), (tmp_path / "out" / "events.jsonl").read_text()
    again = run("--config", str(tmp_path / "out" / "config.yaml"))
    assert again.returncode == 0, again.stderr
    assert f"so this run writes to {tmp_path / 'out-2'}" in again.stderr and "resume_from=latest" in again.stderr
    assert (adapter.read_bytes(), (tmp_path / "out" / "events.jsonl").read_text()) == before
    assert (tmp_path / "out-2" / "out-2.safetensors").is_file()
    first = training_seconds(adapter)
    more = run("--config", str(cfg), "--set", "resume_from=latest", "max_train_steps=5")
    assert more.returncode == 0, more.stderr
    assert "Done: step 5/5" in more.stdout and not (tmp_path / "out-3").exists()
    assert training_seconds(adapter) >= first  # both sessions (4 steps, then 1), not the last one alone


def training_seconds(adapter: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(adapter), framework="numpy") as f:
        return float(f.metadata()["ss_training_time_s"])


@pytest.mark.slow  # a subprocess CLI run
def test_the_demo_preset_trains_from_the_cli(demo):
    """`python train.py --config presets/demo-image.yaml`: the demo workspace's model, data and runs folder."""
    done = run("--config", str(ROOT / "presets" / "demo-image.yaml"), "--workspace", str(demo.root.parent),
               "--set", "max_train_steps=2", "sample_prompts=[]", "save_steps=0")
    assert done.returncode == 0, done.stderr
    assert f"base_model: {demo.sd15}" in done.stderr and f"train_data_dir: {demo.images}" in done.stderr
    out = re.search(r"output_dir: (\S+)", done.stderr).group(1)
    assert Path(out).parent == demo.root.parent / "runs" and Path(out).name.startswith("demo-image")
    assert "Done: step 2/2" in done.stdout and "preset: demo-image" in (Path(out) / "config.yaml").read_text()


def test_config_errors_come_in_one_round(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preset: nope\nlora_rank: -3\nbase_model: ./no-model\ntrain_data_dir: ./no-data\noutput_dir: o\n")
    result = run("--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for problem in ("Unknown preset 'nope'", "'lora_rank' is -3", "no-model", "no-data"):
        assert problem in result.stderr, result.stderr


@pytest.mark.slow  # a subprocess CLI run
def test_plan_prints_no_library_warnings(demo, tmp_path):
    cfg = tmp_path / "llm.yaml"
    cfg.write_text(f"preset: llm-chat\nbase_model: {demo.llama}\ntrain_data_dir: {demo.chat}\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    done = run("--config", str(cfg), "--plan")
    assert done.returncode == 0 and "Memory plan" in done.stdout, done.stderr
    assert "Warning" not in done.stderr, done.stderr
