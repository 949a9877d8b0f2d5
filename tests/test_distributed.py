"""Several processes, one run (studio/distributed.py, studio/fsdp.py): 2 CPU processes with gloo train the tiny Llama
and the tiny SD exactly like one process on the same micro-batches; the studio's launch_and_follow forwards the
events, stops all processes together (and the run resumes with the same count, a different one is refused), a killed
process fails the run with a message and no unfinished files; FSDP on the tiny Llama; the accelerate config; the plan;
the Config tab's GPUs choice.

The multi-process tests launch real processes through `accelerate launch` (tens of seconds each): marked slow."""

import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from studio.config import ConfigError, config_from_dict
from studio.distributed import (ACCELERATE_CONFIG, Processes, _root_cause, accelerate_config, launch_and_follow, join,
                                write_accelerate_config)
from studio.errors import StudioError
from studio.events import EventSink, read_events
from studio.loop import train
from studio.plan.memory import plan_memory
from studio.ui.config_form import GPU_KEY, form_widget, set_config_key, yaml_to_form
from studio.ui.config_tab import gpu_choice
from two_processes import fsdp_leave_worker, two_process_worker

REPO = Path(__file__).resolve().parent.parent
LLM_STEPS = 20


def llm_values(demo, out, **extra):
    return {"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
            "output_dir": str(out), "batch_size": 1, "max_train_steps": LLM_STEPS, "save_steps": 5,
            "sample_every_steps": 0, "sample_prompts": [], **extra}


def sd_values(demo, out, **extra):
    return {"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
            "output_dir": str(out), "batch_size": 1, "max_train_steps": 3, "save_steps": 0,
            "sample_every_steps": 0, "sample_prompts": [], **extra}


def adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors" if path.is_dir() else path))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def header(path: Path) -> dict:
    with safe_open(str(path / "adapter_model.safetensors" if path.is_dir() else path), "pt") as f:
        return f.metadata()


class Recorder:
    """The events launch_and_follow forwards; optionally acts on the first progress event."""

    def __init__(self, on_progress=None):
        self.events, self.on_progress = [], on_progress

    def __call__(self, event):
        self.events.append(event)
        if event.kind == "progress" and self.on_progress:
            action, self.on_progress = self.on_progress, None
            action(self)

    def kinds(self, kind):
        return [e for e in self.events if e.kind == kind]


def launch(cfg, recorder=None, stop=None):
    return launch_and_follow(cfg, EventSink([recorder] if recorder else []), stop or threading.Event())


@pytest.fixture()
def one_thread():
    """The one-process reference runs on one thread, as each launched process does (torchrun sets
    OMP_NUM_THREADS=1): on a shared 2-core machine a second thread makes the tiny models' steps 10-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- fast: no processes started ---------------------------------------------------------------------------------------

def test_each_process_takes_its_share_and_the_noise_follows_the_position():
    group = list(range(7))
    shares = [Processes(rank, 3).micro_batches(group, 2) for rank in range(3)]
    assert shares[0] == [(0, [0, 3]), (6, [6])] and shares[1] == [(1, [1, 4])] and shares[2] == [(2, [2, 5])]
    # micro-batches of 1: the same (position, sample) pairs as one process walking the whole group
    assert sorted(m for r in range(3) for m in Processes(r, 3).micro_batches(group, 1)) == \
        Processes().micro_batches(group, 1)


def test_processes_sum_gradients_and_agree_on_out_of_memory_and_stop(tmp_path):
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    torch.multiprocessing.spawn(two_process_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    got = sorted(results.get() for _ in range(2))
    for rank in (0, 1):  # the same update everywhere: summed gradients and loss; one out of memory = all; one stop = all
        assert got[rank] == (rank, 0.75, [3.0, 3.0, 3.0], [1.0, 1.0], None, True)


def test_leaving_ends_the_process_groups_threads_under_fsdp(tmp_path):
    """FSDP's wrappers hold the process group in reference cycles; left to interpreter shutdown, gloo's worker
    threads abort the process now and then (SIGABRT) as they free their last tensors. leave() ends them."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    torch.multiprocessing.spawn(fsdp_leave_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    for _, ended in sorted(results.get() for _ in range(2)):
        assert ended >= 2  # gloo's 2 workers (and its transport's loop) joined: measured 3; 0 without the collect


def test_num_processes_and_fsdp_are_checked(demo, tmp_path):
    assert config_from_dict(llm_values(demo, tmp_path, num_processes=2, distributed="fsdp")).effective_batch == 2
    with pytest.raises(ConfigError, match="fsdp.*needs task_type text-generation and num_processes 2"):
        config_from_dict(sd_values(demo, tmp_path, num_processes=2, distributed="fsdp"))
    with pytest.raises(ConfigError, match="fsdp"):
        config_from_dict(llm_values(demo, tmp_path, distributed="fsdp"))
    with pytest.raises(ConfigError, match="'num_processes' is 0"):
        config_from_dict(llm_values(demo, tmp_path, num_processes=0))
    # started alone (not by a launcher) with num_processes 2: say how to start it
    with pytest.raises(StudioError, match="python train.py --config"):
        join(config_from_dict(llm_values(demo, tmp_path, num_processes=2)))


def test_accelerate_config_for_ddp_and_fsdp(demo, tmp_path):
    ddp = accelerate_config(config_from_dict(llm_values(demo, tmp_path, num_processes=4)), cuda=True)
    assert (ddp["distributed_type"], ddp["num_processes"], ddp["mixed_precision"]) == ("MULTI_GPU", 4, "no")
    cfg = config_from_dict(llm_values(demo, tmp_path, num_processes=2, distributed="fsdp"))
    gpu = accelerate_config(cfg, cuda=True)["fsdp_config"]
    assert gpu["fsdp_use_orig_params"] is False and gpu["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert gpu["fsdp_sharding_strategy"] == "FULL_SHARD" and gpu["fsdp_sync_module_states"]
    assert not gpu["fsdp_cpu_ram_efficient_loading"]  # waits on the model loader (studio/fsdp.py)
    assert not accelerate_config(cfg, cuda=False)["fsdp_config"]["fsdp_sync_module_states"]  # needs CUDA in accelerate
    path = write_accelerate_config(cfg, tmp_path)
    assert path == tmp_path / ACCELERATE_CONFIG
    written = yaml.safe_load(path.read_text())
    assert written["distributed_type"] == "FSDP" and written["fsdp_config"]["fsdp_version"] == 1
    from accelerate.commands.config.config_args import load_config_from_file
    assert load_config_from_file(str(path)).num_processes == 2  # accelerate reads it


def test_plan_is_per_gpu_and_fsdp_shards_the_llm_weights(demo, tmp_path):
    def weights(**extra):
        cfg = config_from_dict(llm_values(demo, tmp_path, **extra))
        return next(r.gb for r in plan_memory(cfg, "llm", 24.0).rows if r.name == "weights")
    assert weights(num_processes=2) == weights()  # ddp: the whole model on every GPU
    assert weights(num_processes=2, distributed="fsdp") == pytest.approx(weights() / 2)


def test_failure_report_names_the_process_and_how_it_ended():
    log = ("[rank1]: Traceback (most recent call last):\n[rank1]: ValueError: bad value\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\nRoot Cause (first observed failure):\n"
           "[0]:\n  time      : 2026\n  host      : localhost\n  rank      : 1 (local_rank: 1)\n"
           "  exitcode  : 1 (pid: 12)\n")
    assert _root_cause(log).describe(2) == "Training process 1 of 2 failed (exit code 1): ValueError: bad value"
    killed = log.replace("exitcode  : 1", "exitcode  : -9").replace("[rank1]: ValueError: bad value\n", "")
    assert _root_cause(killed).describe(2) == "Training process 1 of 2 failed (killed by SIGKILL)"
    assert _root_cause("no summary") is None


def test_config_tab_offers_gpus_only_with_several(tmp_path):
    widget = form_widget(GPU_KEY)
    assert widget.label == "GPUs" and not widget.visible  # until the page load counts the GPUs
    assert gpu_choice(2) == {"__type__": "update", "visible": True, "maximum": 2}
    assert gpu_choice(1)["visible"] is False
    status, text = set_config_key(GPU_KEY, 2, "preset: demo-llm\n")
    assert yaml.safe_load(text) == {"preset": "demo-llm", "num_processes": 2}
    from studio.ui.config_form import FORM_KEYS
    assert yaml_to_form(text)[1 + FORM_KEYS.index(GPU_KEY)] == 2


# --- slow: 2 processes with gloo -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm_runs(demo, tmp_path_factory):
    """The tiny Llama: one process on micro-batches of 1 with accumulation 2, and 2 processes with batch 1 each
    (launch_and_follow): the same 2 samples per update, the same micro-batches."""
    root = tmp_path_factory.mktemp("llm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread (a module-scoped fixture cannot use it)
    try:
        one = train(config_from_dict(llm_values(demo, root / "one", gradient_accumulation_steps=2)))
    finally:
        torch.set_num_threads(threads)
    recorder = Recorder()
    two = launch(config_from_dict(llm_values(demo, root / "two", num_processes=2)), recorder)
    return one, two, recorder


@pytest.mark.slow
def test_two_processes_train_the_llm_exactly_like_one(llm_runs):
    one, two, _ = llm_runs
    # measured: bit-identical (the same micro-batches, gradients summed in the same order)
    assert max_difference(adapter_weights(one.files[0]), adapter_weights(two.files[0])) == 0.0
    assert two.last_loss == one.last_loss and two.step == LLM_STEPS
    saved = yaml.safe_load((two.output_dir / "config.yaml").read_text())
    assert saved["num_processes"] == 2 and (two.output_dir / ACCELERATE_CONFIG).is_file()
    assert header(two.files[0])["ss_total_batch_size"] == "2" == header(one.files[0])["ss_total_batch_size"]
    assert header(two.files[0])["studio_num_processes"] == "2"


@pytest.mark.slow
def test_launch_and_follow_forwards_the_runs_events(llm_runs):
    _, two, recorder = llm_runs
    assert [e.step for e in recorder.kinds("progress")] == list(range(1, LLM_STEPS + 1))
    start = recorder.kinds("start")[0]
    assert "effective batch 2 = batch 1 x 1 accumulation x 2 processes" in start.message
    assert [e.step for e in recorder.kinds("checkpoint")] == [5, 10, 15, 20]
    assert recorder.events[-1].kind == "done" and recorder.events[-1].data["files"] == [str(two.files[0])]
    # the main process alone wrote: one event per step in the log, one TensorBoard file
    assert [e.step for e in read_events(two.output_dir / "events.jsonl") if e.kind == "progress"] == \
        list(range(1, LLM_STEPS + 1))
    assert len(list((two.output_dir / "logs").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_fsdp_trains_the_llm_like_ddp(demo, llm_runs, tmp_path):
    _, two, _ = llm_runs
    fsdp = launch(config_from_dict(llm_values(demo, tmp_path / "fsdp", num_processes=2, distributed="fsdp")))
    assert yaml.safe_load((tmp_path / "fsdp" / ACCELERATE_CONFIG).read_text())["distributed_type"] == "FSDP"
    # ddp runs the fused LoRA layers (studio/fused_lora.py: base + LoRA input gradients summed in one addmm, a
    # reassociated fp32 sum), fsdp peft's own: the same within fp32 rounding (measured 1.3e-7)
    assert max_difference(adapter_weights(two.files[0]), adapter_weights(fsdp.files[0])) <= 1e-6


@pytest.fixture(scope="module")
def stopped(demo, tmp_path_factory):
    """A 2-process run of the tiny Llama stopped (like Cancel) once its first update is reported."""
    out = tmp_path_factory.mktemp("stop") / "stopped"
    stop = threading.Event()
    recorder = Recorder(on_progress=lambda _: stop.set())
    # A checkpoint every step: slower steps, so the stop lands well before LLM_STEPS.
    cfg = config_from_dict(llm_values(demo, out, num_processes=2, max_train_steps=2000, save_steps=1))
    return launch(cfg, recorder, stop), recorder


@pytest.mark.slow
def test_stop_ends_every_process_at_the_same_step_with_a_checkpoint(stopped):
    result, recorder = stopped
    assert result.stopped and 0 < result.step < LLM_STEPS
    assert recorder.events[-1].kind == "stopped" and recorder.kinds("checkpoint")[-1].step == result.step
    assert result.files == [result.output_dir / "stopped"]


@pytest.mark.slow
def test_resume_needs_the_same_count_and_then_replays_the_run_exactly(demo, llm_runs, stopped):
    _, two, _ = llm_runs
    out = stopped[0].output_dir
    with pytest.raises(StudioError, match="saved by a run with 2 process.*num_processes: 2"):
        train(config_from_dict(llm_values(demo, out, max_train_steps=2000, resume_from="latest")))

    # The CLI: --num-processes relaunches itself; the resumed run ends exactly where the uninterrupted one did.
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(out / "config.yaml"),
                              "--num-processes", "2", "--set", f"max_train_steps={LLM_STEPS}", "resume_from=latest"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"Done: step {LLM_STEPS}/{LLM_STEPS}") == 1  # from the launching process only
    assert "effective batch 2 = batch 1 x 1 accumulation x 2 processes" in resumed.stdout
    assert max_difference(adapter_weights(two.files[0]), adapter_weights(out / "stopped")) == 0.0


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_a_stop_the_processes_cannot_honour_in_time_ends_them(demo, tmp_path):
    stop, started = threading.Event(), []

    def stop_while_loading(event):
        if "pid" in event.data:  # launch_and_follow's first event: the launcher
            started.append(psutil.Process(event.data["pid"]))
        elif event.kind == "plan" and not stop.is_set():  # before the model loads: no update boundary within the grace
            started.extend(started[0].children(recursive=True))
            stop.set()

    recorder = Recorder()
    cfg = config_from_dict(llm_values(demo, tmp_path / "cancelled", num_processes=2))
    result = launch_and_follow(cfg, EventSink([stop_while_loading, recorder]), stop, grace_s=0.0)
    assert result.stopped and result.files == []
    assert recorder.events[-1].kind == "stopped" and "ended before they could save" in recorder.events[-1].message
    assert len(started) == 3 and all(gone(p) for p in started)  # the launcher and both training processes


@pytest.mark.slow
def test_a_killed_process_fails_the_run_with_a_message_and_no_unfinished_files(demo, tmp_path):
    out = tmp_path / "killed"
    killed = []

    def kill_process_1(recorder):
        launcher = psutil.Process(recorder.kinds("log")[0].data["pid"])
        workers = {p.environ().get("RANK"): p for p in launcher.children(recursive=True)}
        workers["1"].send_signal(signal.SIGKILL)
        killed.extend([launcher, *workers.values()])

    recorder = Recorder(on_progress=kill_process_1)
    cfg = config_from_dict(llm_values(demo, out, num_processes=2, max_train_steps=100_000, save_steps=1))
    with pytest.raises(StudioError, match=r"Training process 1 of 2 failed \(killed by SIGKILL\)") as error:
        launch(cfg, recorder)
    assert killed and "resume_from: latest" in str(error.value)
    assert recorder.events[-1].kind == "failed" and "SIGKILL" in recorder.events[-1].message
    assert read_events(out / "events.jsonl")[-1].kind == "failed"  # what a reattaching studio reads
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or "tmp-" in p.name)]
    assert leftovers == []
    assert all((c / "state.pt").is_file() and (c / "adapter.safetensors").is_file()
               for c in (out / "checkpoints").iterdir())
    assert len(killed) == 3 and all(gone(p) for p in killed)  # the launcher and both processes


@pytest.mark.slow
def test_two_processes_train_the_sd_lora_exactly_like_one(demo, tmp_path, one_thread):
    one = train(config_from_dict(sd_values(demo, tmp_path / "one", gradient_accumulation_steps=2)))
    two = launch(config_from_dict(sd_values(demo, tmp_path / "two", num_processes=2)))
    # measured: bit-identical — each micro-batch's noise is seeded by its position in the update's group
    assert max_difference(load_file(str(one.files[0])), load_file(str(two.files[0]))) == 0.0
    assert header(two.files[0])["ss_total_batch_size"] == "2"


def test_fsdp_refuses_4bit_weights_it_cannot_flatten(demo):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from studio.fsdp import check_4bit_storage

    def qlora(**storage):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **storage)
        base = AutoModelForCausalLM.from_pretrained(demo.llama, quantization_config=quantization, device_map="cpu")
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))

    with pytest.raises(StudioError, match="bnb_4bit_quant_storage.*torch.uint8"):
        check_4bit_storage(qlora())  # transformers' default storage
    check_4bit_storage(qlora(bnb_4bit_quant_storage=torch.bfloat16))  # the FSDP-QLoRA recipe's


@pytest.mark.slow
def test_the_studio_queue_runs_a_multi_process_job_as_one_job(demo, tmp_path):
    """The job runner launches a num_processes job as a subprocess and follows it: the job's state and the run index
    show one job, done, with every step."""
    from studio.jobs import JobRunner
    from studio.run_index import RunIndex

    runner = JobRunner(RunIndex(tmp_path))
    runner.start(config_from_dict(llm_values(demo, tmp_path / "runs" / "two-gpus", num_processes=2,
                                             max_train_steps=4)))
    state = runner.wait(300)
    assert state.status == "done" and state.step == state.total == 4 and len(state.losses) == 4, state.log
    assert any("Started 2 training processes" in line for line in state.log)
    record = RunIndex(tmp_path).get("two-gpus")
    assert (record.status, record.step) == ("done", 4) and record.adapter_bytes > 0
