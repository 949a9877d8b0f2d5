"""One run over several processes (one per GPU, or CPU processes with gloo): data-parallel training through accelerate.

Inside the processes (the loop): `join(cfg)` returns the run's `Processes` — just this one, or the N that
`accelerate launch` / torchrun started (their WORLD_SIZE / RANK environment; accelerate's PartialState opens the
process group: nccl on CUDA, gloo on the CPU). Every process loads the same model and walks the same groups of samples
(one group per optimizer update, `batch_size x gradient_accumulation_steps x N` samples); each takes its share
`group[rank::N]` in micro-batches of `batch_size`, weights each micro-batch's loss by its share of the whole group, and
one all-reduce sums the LoRA gradients (and the loss) over the processes: N processes make exactly the update one
process makes on the whole group. The noise of a micro-batch is seeded by its position in the group, so it does not
depend on which process runs it. Only the main process writes: events, config.yaml, checkpoints, exports, samples.

Outside (the CLI and the studio): `launch_and_follow` writes output_dir/accelerate_config.yaml, starts
`accelerate launch --config_file it train.py --config <the resolved config>` as a subprocess and follows the run
through output_dir/events.jsonl, forwarding each event. A stop request is a file the main process looks for at every
update boundary (all processes then stop at the same update, with a checkpoint); processes that do not stop in time,
and all the others when one dies, are killed. `distributed: fsdp` (LLMs) shards the frozen base: studio/fsdp.py.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from studio import fsdp
from studio.checkpoints import capture_rng, checkpoints_dir
from studio.config import RunConfig, save_config
from studio.errors import StudioError
from studio.events import FINAL_KINDS, Event, EventSink, parse_events
from studio.fileio import remove_orphans, write_errors, write_text_atomic

STOP_FILE_ENV = "STUDIO_STOP_FILE"  # the launcher's stop request: the main process stops the run when it exists
TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
ACCELERATE_CONFIG = "accelerate_config.yaml"
LAUNCH_LOG = "launch.log"
STOP_GRACE_S = 120.0  # a stop request waits this long for the step, checkpoint and export before killing
KILL_GRACE_S = 45.0  # after SIGTERM, before SIGKILL: the launcher gives its processes 30 s to end


def launched() -> bool:
    """This process is one of several that accelerate launch / torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_launch(cfg: RunConfig) -> bool:
    """The run wants several processes and this is not one of them: start them (launch_and_follow)."""
    return cfg.num_processes > 1 and not launched()


def reports_run() -> bool:
    """This process reports the run (its record in the workspace's index, the final summary): not one of the other
    processes of a launch, nor a process launch_and_follow started (the launching process reports)."""
    return os.environ.get("RANK", "0") == "0" and STOP_FILE_ENV not in os.environ


def gpu_count() -> int:
    return torch.cuda.device_count()


# --- inside the processes --------------------------------------------------------------------------------------------

@dataclass
class Processes:
    """The processes of one run and what the loop does with them; one process (the default) changes nothing."""
    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # under a launcher: this process's device (cuda:LOCAL_RANK or cpu)
    sharded: bool = False  # distributed: fsdp
    stop_file: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batches(self, group: list[int], size: int) -> list[tuple[int, list[int]]]:
        """This process's micro-batches of `group` as (position in the group of its first sample, indices)."""
        share = group[self.rank::self.world]
        return [(self.rank + start * self.world, share[start:start + size]) for start in range(0, len(share), size)]

    def sum_gradients(self, params: list[torch.Tensor], loss: torch.Tensor | None) -> torch.Tensor | None:
        """Sum the gradients of `params` and the weighted losses over the processes (one all-reduce); returns the
        group's loss, or None in every process when one ran out of memory (its `loss` is None): they all back off
        together. A process whose share was empty adds zeros."""
        if self.world == 1:
            return loss
        failed = loss is None
        grads = [torch.zeros_like(p) if failed or p.grad is None else p.grad for p in params]
        device = params[0].device
        tail = torch.tensor([0.0, float(failed)], device=device)
        if not failed:
            tail[0] = loss.float()
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [tail])
        dist.all_reduce(flat)
        if flat[-1].item():
            return None
        for param, chunk in zip(params, flat[:-2].split([p.numel() for p in params])):
            param.grad = chunk.view_as(param).to(param.dtype)
        return flat[-2]

    def should_stop(self, stop: threading.Event) -> bool:
        """A stop request (the event, or the launcher's stop file), agreed by all processes: they stop together."""
        asked = stop.is_set() or bool(self.is_main and self.stop_file and self.stop_file.exists())
        if self.world == 1:
            return asked
        flag = torch.tensor([float(asked)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def checkpoint_state(self) -> dict:
        """What a checkpoint needs beyond one process's: the process count, and every process's global RNG states
        (LoRA dropout draws from them). Every process must call it."""
        if self.world == 1:
            return {}
        states: list = [None] * self.world
        dist.all_gather_object(states, capture_rng())
        return {"num_processes": self.world, "process_rng": states}

    def own_rng_state(self, state: dict) -> dict:
        """This process's RNG states from a checkpoint's training state."""
        return state["process_rng"][self.rank] if "process_rng" in state else state["rng"]

    def check_resume(self, state: dict, path: Path) -> None:
        saved = state.get("num_processes", 1)
        if saved != self.world:
            raise StudioError(f"resume_from {path} was saved by a run with {saved} process(es); this run has "
                              f"{self.world}. The data order and each update's samples depend on the process count: "
                              f"resume with num_processes: {saved}, or start a new run from this run's exported "
                              "adapter with init_lora.")

    def prepare(self, engine) -> None:
        """After the engine loaded: under fsdp the frozen base is sharded; the LoRA weights are made the main
        process's everywhere (they start equal from the same seed; this makes sure)."""
        if self.world == 1:
            return
        if self.sharded:
            fsdp.shard(engine, self.device)
        for group in engine.param_groups():
            for param in group["params"]:
                dist.broadcast(param.data, src=0)
        if self.rank:
            torch.manual_seed(engine.cfg.seed + self.rank)  # each process its own dropout draws

    def whole_model(self, engine):
        """Around exports: the engine's model as peft built it (fsdp's wrappers set aside)."""
        return fsdp.unwrapped(engine) if self.sharded else nullcontext()

    @property
    def renders_samples(self) -> bool:
        """Samples come from the main process; under fsdp none (generation would need every process)."""
        return self.is_main and not self.sharded

    def leave(self) -> None:
        if self.world > 1 and dist.is_initialized():
            # FSDP's wrappers and autograd hooks hold the process group in reference cycles: collect them first, or
            # destroy_process_group leaves gloo's worker threads running into interpreter shutdown, where a worker
            # dropping its last collective's tensors needs the GIL and aborts the process ("terminate called without
            # an active exception", SIGABRT; about 1 run in 15 on 2 busy cores).
            gc.collect()
            dist.destroy_process_group()


def join(cfg: RunConfig) -> tuple[RunConfig, Processes]:
    """The run's processes: this one alone, or those a launcher started (then num_processes is their count)."""
    if not launched():
        if cfg.num_processes > 1:
            raise StudioError(f"num_processes is {cfg.num_processes}, but this process was started alone. Run "
                              "`python train.py --config ...`, which starts the processes itself, or `accelerate "
                              "launch train.py --config ...`.")
        return cfg, Processes()
    from accelerate import PartialState

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "mps":
        raise StudioError("Several processes train on CUDA GPUs or on the CPU, not on Apple MPS. Set num_processes: 1 "
                          "or device: cpu.")
    state = PartialState(cpu=cpu)  # init_process_group from the launcher's environment: nccl on CUDA, gloo on CPU
    if cfg.distributed == "fsdp" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        raise StudioError("distributed: fsdp takes its FSDP settings from accelerate: start the run with `python "
                          "train.py --config ...` (it writes output_dir/accelerate_config.yaml and launches with it), "
                          f"or `accelerate launch --config_file output_dir/{ACCELERATE_CONFIG} train.py --config ...`.")
    stop_file = os.environ.get(STOP_FILE_ENV)
    device = torch.device("cpu") if cpu else state.device  # (accelerate says cpu:0, which FSDP refuses)
    processes = Processes(state.process_index, state.num_processes, device, cfg.distributed == "fsdp",
                          Path(stop_file) if stop_file else None)
    return dataclasses.replace(cfg, num_processes=state.num_processes), processes


# --- starting them -------------------------------------------------------------------------------------------------

def accelerate_config(cfg: RunConfig, cuda: bool) -> dict:
    """What `accelerate launch --config_file` reads: N processes on this machine; precision stays the trainer's."""
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
              "machine_rank": 0, "num_processes": cfg.num_processes, "gpu_ids": "all", "mixed_precision": "no",
              "rdzv_backend": "static", "same_network": True, "use_cpu": False}
    if cfg.distributed == "fsdp":
        config.update(distributed_type="FSDP", fsdp_config=fsdp.accelerate_settings(cuda))
    return config


def write_accelerate_config(cfg: RunConfig, out: Path) -> Path:
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    text = ("# Written by LoRA Studio for this run (num_processes, distributed). The same run by hand, also over several "
            "machines:\n#   accelerate launch --config_file this.yaml [--num_machines M --machine_rank R "
            "--main_process_ip IP --main_process_port P] train.py --config config.yaml\n"
            + yaml.safe_dump(accelerate_config(cfg, cuda), sort_keys=False))
    return write_text_atomic(out / ACCELERATE_CONFIG, text)


def launch_command(accelerate_file: Path, config: Path) -> list[str]:
    # --main_process_port 0: a free port, so runs side by side do not collide
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_file),
            "--main_process_port", "0", str(TRAIN_SCRIPT), "--config", str(config)]


def check_devices(cfg: RunConfig) -> None:
    gpus = gpu_count()
    if gpus and cfg.device != "cpu" and cfg.num_processes > gpus:
        raise StudioError(f"num_processes is {cfg.num_processes} but {gpus} CUDA GPU(s) are visible: one process "
                          f"per GPU. Set num_processes to at most {gpus}.")


def launch_and_follow(cfg: RunConfig, events: EventSink, stop: threading.Event, *, console: bool = False,
                      grace_s: float = STOP_GRACE_S):
    """Train `cfg` in `cfg.num_processes` processes started through accelerate, forwarding the run's events to
    `events` as they appear in output_dir/events.jsonl, until it ends; returns the loop's RunResult (from the events).

    `stop` set: the processes stop together after their step (checkpoint, export); if no checkpoint comes within
    `grace_s` (still loading, or hung), they are killed.
    A process that dies ends the run as failed: the others are stopped, unfinished files are removed, and a
    StudioError says which process and why (its output is in output_dir/launch.log; `console`: on this terminal).
    """
    check_devices(cfg)
    out = Path(cfg.output_dir)
    with write_errors(out, "output_dir"):
        out.mkdir(parents=True, exist_ok=True)
    accelerate_file = write_accelerate_config(cfg, out)
    tail = _EventTail(out / "events.jsonl")  # from its current end: earlier runs' events stay behind
    with tempfile.TemporaryDirectory(prefix="studio-launch-") as tmp:
        config = save_config(cfg, Path(tmp) / "config.yaml")
        stop_file = Path(tmp) / "stop"
        env = {**os.environ, STOP_FILE_ENV: str(stop_file), "PYTHONUNBUFFERED": "1"}
        with (nullcontext() if console else open(out / LAUNCH_LOG, "w", encoding="utf-8")) as log:
            # Its own session: a Ctrl-C in the terminal reaches this process only, which stops the run in order.
            process = subprocess.Popen(launch_command(accelerate_file, config), env=env, stdout=log,
                                       stderr=subprocess.STDOUT if log else None, start_new_session=True)
            follower = _Follower(process, tail, events, cfg.num_processes)
            events.emit("log", message=f"Started {cfg.num_processes} training processes through accelerate "
                        f"(launcher pid {process.pid})" + ("" if console else f"; their output: {out / LAUNCH_LOG}")
                        + ".", pid=process.pid)
            try:
                follower.run(stop, stop_file, grace_s)
            finally:
                _end(process)  # also on an error here or a second Ctrl-C: no process is left behind
    return follower.result(out, None if console else out / LAUNCH_LOG)


class _EventTail:
    """New complete lines of an events.jsonl as Events (a line being written waits for the next read)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0

    def read(self) -> list[Event]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return parse_events(complete.decode("utf-8"))


class _Follower:
    POLL_S = 0.2

    def __init__(self, process: subprocess.Popen, tail: _EventTail, events: EventSink, count: int):
        self.process, self.tail, self.events, self.count = process, tail, events, count
        self.final: Event | None = None
        self.last: Event | None = None  # the last progress event
        self.killed_after_stop = False
        self.stopping_in_order = False  # the stop checkpoint came: the export that follows may take its time

    def run(self, stop: threading.Event, stop_file: Path, grace_s: float) -> None:
        asked = None
        while self.process.poll() is None:
            self._forward(asked is not None)
            if stop.is_set() and asked is None:
                stop_file.touch()
                asked = time.monotonic()
                self.events.emit("log", message=f"Stopping all {self.count} processes after their step...")
            if asked is not None and not self.stopping_in_order and time.monotonic() - asked > grace_s:
                self.killed_after_stop = True
                _end(self.process)
            time.sleep(self.POLL_S)
        self._forward(asked is not None)

    def _forward(self, stop_asked: bool) -> None:
        for event in self.tail.read():
            self.events.emit(event.kind, event.step, event.total, event.message, **event.data)
            if event.kind == "progress":
                self.last = event
            self.stopping_in_order |= stop_asked and event.kind == "checkpoint"
            if event.kind in FINAL_KINDS:
                self.final = event

    def result(self, out: Path, log: Path | None):
        from studio.loop import RunResult

        final, code, last = self.final, self.process.returncode, self.last
        loss = last.data.get("loss") if last else None
        if code == 0 and final is not None and final.kind != "failed":
            return RunResult(out, [Path(f) for f in final.data.get("files", [])], final.step, final.total,
                             final.kind == "stopped", loss)
        removed = remove_orphans(out, checkpoints_dir(out))  # what the killed processes were writing
        cleaned = f" Removed {len(removed)} unfinished file(s) they were writing." if removed else ""
        if self.killed_after_stop:  # a stop request they could not honour in time (e.g. still loading)
            self._report(out, "stopped", f"Stopped: the {self.count} processes were ended before they could save; "
                                         f"the last checkpoint is kept.{cleaned}")
            return RunResult(out, [], last.step if last else 0, last.total if last else 0, True, loss)
        cause = _root_cause(log.read_text(encoding="utf-8", errors="replace") if log and log.is_file() else "")
        if final is not None and final.kind == "failed" and not (cause and cause.signal):
            raise StudioError(final.message)  # the run's own error, already reported
        where = f"its output: {log}" if log else "see the output above"
        message = (f"{cause.describe(self.count) if cause else f'The training processes failed (exit code {code})'}. "
                   f"All {self.count} processes were stopped ({where}); the run continues from its last checkpoint "
                   f"with resume_from: latest.{cleaned}")
        self._report(out, "failed", message)
        raise StudioError(message)

    def _report(self, out: Path, kind: str, message: str) -> None:
        """The run's end, which its processes could not report: to the listeners and to its events.jsonl."""
        reporter = EventSink(self.events.listeners)
        reporter.open_jsonl(out / "events.jsonl")
        try:
            reporter.emit(kind, message=message)
        finally:
            reporter.close_jsonl()


@dataclass
class _Cause:
    """The first process that failed, as the launcher (torch elastic) reports it."""
    rank: int
    exitcode: int
    error: str | None  # the exception it printed, if any

    @property
    def signal(self) -> str | None:
        return signal.Signals(-self.exitcode).name if self.exitcode < 0 else None

    def describe(self, count: int) -> str:
        how = f"killed by {self.signal}" if self.signal else f"exit code {self.exitcode}"
        return f"Training process {self.rank} of {count} failed ({how})" + (f": {self.error}" if self.error else "")


# torch elastic's summary of the first failure, and a Python exception as a process prints it ("[rank1]: ...").
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL)
_EXCEPTION = re.compile(r"^\[rank(\d+)\]:\s*((?:[\w.]+)(?:Error|Exception)\b.*)$", re.MULTILINE)


def _root_cause(text: str) -> _Cause | None:
    found = _ROOT_CAUSE.search(text)
    if not found:
        return None
    rank, exitcode = int(found.group(1)), int(found.group(2))
    errors = [m.group(2) for m in _EXCEPTION.finditer(text) if int(m.group(1)) == rank]
    return _Cause(rank, exitcode, errors[-1] if errors else None)


def _end(process: subprocess.Popen) -> None:
    """Stop the launcher if it still runs: on SIGTERM it ends its processes (SIGTERM, SIGKILL after 30 s); a
    launcher that hangs gets SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
