"""The one training loop, for every task: `train(cfg, events, stop)`.

Read top to bottom: set up (device, engine, optimizer, schedule), maybe resume, then updates until the step budget
is spent or a stop is requested, with validation, samples and checkpoints on the way (also when asked for through
`Requests`), then the export. Each update is one group of `batch_size * gradient_accumulation_steps` samples, run
as micro-batches of `batch_size` whose gradients add up; with num_processes > 1 each process runs its share of a
group that many times larger (studio/distributed.py sums the gradients; only the main process writes). An update
that runs out of memory is retried with smaller settings (studio/backoff.py), and `output_dir/config.yaml` is
rewritten with them. What differs between image and text training lives in the engine (studio/engines/).
"""

from __future__ import annotations

import threading
import time
import traceback
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio import checkpoints
from studio.backoff import BLOCK_SWAP, CHECKPOINTING, apply_backoff, exhausted_message, next_backoff
from studio.checkpoints import Position
from studio.compute_dtype_norms import norms_in_compute_dtype
from studio.config import RunConfig, save_config
from studio.distributed import Processes, join
from studio.engines import make_engine
from studio.engines.base import Engine
from studio.errors import StudioError
from studio.events import EventSink
from studio.export.metadata import header_fields
from studio.fileio import remove_orphans, write_errors
from studio.hardware import autocast_dtype, configure_backends, pick_device
from studio.master_weights import trainable_weights
from studio.optim import build_optimizer, build_scheduler, seed_everything
from studio.plan.fit import Fitted
from studio.plan.run import measure_peak, report_plan
from studio.run_reports import ProgressReports, announce_end, announce_start
from studio.tensorboard_log import TensorBoardListener


@dataclass
class RunResult:
    output_dir: Path
    files: list[Path] = field(default_factory=list)
    step: int = 0
    total_steps: int = 0
    stopped: bool = False
    last_loss: float | None = None
    best_val_loss: float | None = None  # the lowest validation loss (validation_split / validation_dir) and its step
    best_val_step: int | None = None


@dataclass
class Requests:
    """Sample now / Save now while a run goes: set a flag from any thread; the loop reads it at the next update
    boundary (like `stop`), renders samples or saves a checkpoint plus a <name>-stepNNNNNN adapter, and clears it."""
    sample: threading.Event = field(default_factory=threading.Event)
    save: threading.Event = field(default_factory=threading.Event)


def train(cfg: RunConfig, events: EventSink | None = None, stop: threading.Event | None = None,
          fitted: Fitted | None = None, requests: Requests | None = None) -> RunResult:
    """Run a training job to the end (or to a stop request). Every outcome is also an event.

    `fitted` is the fit that produced `cfg` (studio.plan.fit_config: its reasons and memory plan are reported);
    without it the run is planned as it stands. `requests`: flags for samples or a save now.
    """
    events = events or EventSink()
    stop = stop or threading.Event()
    requests = requests or Requests()
    out = Path(cfg.output_dir)
    procs = Processes()
    try:
        cfg, procs = join(cfg)  # this process alone, or one of those accelerate launch started (studio/distributed.py)
        if procs.is_main:
            _open_output_dir(cfg, out, events)  # inside: an unusable output_dir is a 'failed' event like the rest
        else:
            events = EventSink()  # the main process reports and writes for all
        return _run(cfg, out, events, stop, fitted, requests, procs)
    except StudioError as exc:
        events.emit("failed", message=str(exc))
        raise
    except Exception as exc:
        events.emit("failed", message=f"Training failed: {type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc())
        raise
    finally:
        events.close_jsonl()
        procs.leave()


def _open_output_dir(cfg: RunConfig, out: Path, events: EventSink) -> None:
    """Create output_dir, log the run's events there, save its config.yaml, and sweep the temporary files a killed
    save left in it."""
    with write_errors(out, "output_dir"):
        out.mkdir(parents=True, exist_ok=True)
        events.open_jsonl(out / "events.jsonl")
        save_config(cfg, out / "config.yaml")  # `train.py --config output_dir/config.yaml` reproduces the run
        removed = remove_orphans(out, checkpoints.checkpoints_dir(out))
    if removed:
        events.emit("log", message=f"Removed {len(removed)} unfinished file(s) an interrupted save left in {out}: "
                    f"{', '.join(str(p.relative_to(out)) for p in removed)}")


def _run(cfg: RunConfig, out: Path, events: EventSink, stop: threading.Event, fitted: Fitted | None,
         requests: Requests, procs: Processes) -> RunResult:
    plan = report_plan(cfg, fitted, events)  # first: building the planner's meta model may draw random numbers
    run = _set_up(cfg, out, events, procs)
    engine, device, pos, total = run.engine, run.device, run.pos, run.total

    tensorboard = [TensorBoardListener(cfg.logging_dir or out / "logs")] if procs.is_main else []
    events.listeners.extend(tensorboard)
    announce_start(cfg, out, events, engine, procs, pos, total)
    progress, started, stopped = ProgressReports(events, device, total, pos.step), time.time(), False
    earlier = pos.seconds  # training time before a resume: a run's time is the sum of its sessions
    engine.train_mode(True)
    try:
        groups = run.groups()
        while pos.step < total:
            if pos.update_in_epoch >= len(groups):  # the epoch is done
                pos.epoch, pos.update_in_epoch = pos.epoch + 1, 0
                groups = run.groups()
            loss = run.update(groups[pos.update_in_epoch])
            progress.report()  # the previous update's, now that this one is queued (studio/run_reports.py)
            if loss is None:  # out of memory: lower a setting, then the same update again
                if run.back_off():
                    # New resolution / max_length: the epoch's groups are made afresh at the same position, so a
                    # few samples of this epoch may be seen twice or not at all.
                    groups = run.groups()
                continue
            pos.step, pos.update_in_epoch = pos.step + 1, pos.update_in_epoch + 1
            progress.hold(pos, loss, run.scheduler.get_last_lr()[0])
            if run.acts_now(requests, stop):
                progress.report()
            # --- validation, samples, checkpoints, stop and user requests: only at update boundaries -------------
            if run.needs_validation():
                run.validate()
            if (run.needs_sample() or run.requested(requests.sample)) and procs.renders_samples:
                emit_samples(engine, run.cfg, out, events, pos.step, total)
            if procs.should_stop(stop):  # all processes stop at the same update
                stopped = True
                break
            pos.seconds = earlier + time.time() - started  # saved with a checkpoint, for a resume to add to
            run.save_on_schedule(now=run.requested(requests.save), seconds=pos.seconds)

        progress.report()
        if run.validated_step != pos.step:
            run.validate()  # once at the end, also of a stopped run
        pos.seconds = earlier + time.time() - started
        run.save("stop" if stopped else "final")
        if not stopped and procs.renders_samples:
            emit_samples(engine, run.cfg, out, events, pos.step, total)
        measured = measure_peak(device, plan, events)
        files = run.export(earlier + time.time() - started, measured)
    finally:
        with suppress(Exception):  # a run that fails still reports the update it finished (a failed GPU cannot)
            progress.report()
        for listener in tensorboard:
            events.listeners.remove(listener)
            listener.close()
    return announce_end(RunResult(out, files, pos.step, total, stopped, progress.last_loss,
                                  *(run.best_val or (None, None))), events)


def _set_up(cfg: RunConfig, out: Path, events: EventSink, procs: Processes) -> "_Training":
    """The device, the loaded engine, the optimizer and schedule, and the position (a resumed one)."""
    seed_everything(cfg.seed)
    device = procs.device or pick_device(cfg.device)
    configure_backends(device)
    autocast = autocast_dtype(cfg.mixed_precision, device)
    engine = make_engine(cfg, device, autocast, events)
    events.emit("log", message=f"Loading {cfg.base_model} on {device.type}...")
    engine.load()
    procs.prepare(engine)
    run = _Training(cfg, out, events, engine, device, autocast, procs)
    if cfg.resume_from:
        run.resume(cfg.resume_from)
    return run


class _Training:
    """A run's state between updates and the steps `_run` takes with it. An update is one group of
    `batch_size * gradient_accumulation_steps` samples from the engine, split here into micro-batches of
    `batch_size`; an out-of-memory back-off changes the split (or other settings) and `cfg`, never the groups."""

    def __init__(self, cfg: RunConfig, out: Path, events: EventSink, engine: Engine, device: torch.device,
                 autocast: torch.dtype | None, procs: Processes):
        self.cfg, self.out, self.events, self.engine = cfg, out, events, engine
        self.device, self.autocast, self.procs = device, autocast, procs
        self.pos = Position()
        self.total = cfg.max_train_steps or cfg.epochs * len(self.groups())
        # bf16/fp16 runs: LoRA weights in the compute dtype, fp32 masters in the optimizer (studio/master_weights.py)
        self.weights = trainable_weights(engine.param_groups(), autocast, procs.sharded)
        if not (procs.sharded or cfg.torch_compile):  # FSDP owns the weights' storage; dynamo: eager-only Function
            from studio.fused_lora import fuse_lora_linears  # imports peft
            fuse_lora_linears(engine.trainable_modules())
        if autocast is not None:  # no fp32 round trip around every norm (studio/compute_dtype_norms.py)
            norms_in_compute_dtype(engine.trainable_modules(), autocast)
        self.optimizer = build_optimizer(cfg, self.weights.groups, device)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)  # fp16 underflows; bf16 not
        self.rng = torch.Generator().manual_seed(cfg.seed)  # noise and timesteps are drawn from here (checkpointed)
        self.best_val: tuple[float, int] | None = None  # (loss, step): the lowest validation loss so far
        self.validated_step: int | None = None

    def groups(self) -> list[list[int]]:
        """The current epoch's sample groups, one optimizer update each."""
        return self.engine.batches(self.pos.epoch, self.cfg.effective_batch)

    # --- one update ----------------------------------------------------------------------------------------------
    def update(self, group: list[int]) -> torch.Tensor | None:
        """One optimizer update on `group`; returns its mean loss (on the device, unread), or None when it ran out of
        memory (then nothing has changed: no step taken, gradients cleared, the noise RNG rewound)."""
        rng_state = self.rng.get_state()
        try:
            loss = self._forward_backward(group)
        except torch.OutOfMemoryError:
            loss = None  # leaving this block frees the error's traceback and with it the step's tensors
        loss = self.procs.sum_gradients(self.weights.grad_owners, loss)  # None everywhere when one ran out of memory
        if loss is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.weights.discard()
            self.rng.set_state(rng_state)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        self.weights.attach_grads()
        if self.cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.weights.grad_owners, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.publish()
        return loss

    def _forward_backward(self, group: list[int]) -> torch.Tensor:
        """Accumulate the gradient of the group's mean loss over this process's micro-batches of it; returns their
        share of that loss."""
        group_loss = torch.zeros((), device=self.device)
        seed = int(torch.randint(2**62, (1,), generator=self.rng))  # one draw per update, the same in every process
        for position, micro in self.procs.micro_batches(group, self.cfg.batch_size):
            batch = self.engine.collate(micro, self.pos.epoch)
            # The noise of a micro-batch follows from its place in the group, not from the process that runs it.
            rng = torch.Generator().manual_seed(seed + position)
            with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext():
                loss = self.engine.loss(batch, rng)
            loss = loss * (len(micro) / len(group))  # weighted by its share of the samples: any split, same gradient
            self.scaler.scale(loss).backward()
            self.weights.collect()
            group_loss += loss.detach().float()
        return group_loss

    # --- out of memory -------------------------------------------------------------------------------------------
    def back_off(self) -> bool:
        """Lower the next setting on the ladder (studio/backoff.py) after an update ran out of memory; returns
        whether the engine remade its data. With nothing left to lower: a checkpoint, then a StudioError."""
        step = self.pos.step + 1
        change = next_backoff(self.cfg)
        if change is None:
            path = self.save("out-of-memory")
            raise StudioError(f"{exhausted_message(self.cfg, step)} Checkpoint of the {self.pos.step} step(s) done: "
                              f"{path}.")
        self.cfg = self.engine.cfg = apply_backoff(self.cfg, change)
        if change.kind == CHECKPOINTING:
            self.engine.enable_gradient_checkpointing()
        elif change.kind == BLOCK_SWAP:
            self.engine.apply_block_swap()
        elif change.remakes_data:
            self.engine.apply_length(self.cfg)
        if self.procs.is_main:
            save_config(self.cfg, self.out / "config.yaml")  # a rerun from it starts with settings that fit
        self.events.emit("backoff", step=self.pos.step, total=self.total, message=change.describe(step),
                         change=change.kind, changes={key: list(pair) for key, pair in change.changes.items()})
        return change.remakes_data

    # --- checkpoints, samples ------------------------------------------------------------------------------------
    def acts_now(self, requests: Requests, stop: threading.Event) -> bool:
        """Whether anything but the next update follows this one (several processes agree on a stop each time)."""
        return (self.procs.world > 1 or stop.is_set() or requests.sample.is_set() or requests.save.is_set()
                or self.needs_validation() or self.needs_sample() or self.needs_save() or self.needs_adapter())

    def needs_save(self) -> bool:
        return self._every(self.cfg.save_steps)

    def needs_adapter(self) -> bool:
        every = self.cfg.save_adapter_every
        return self._every(self.cfg.save_steps if every is None else every)

    def needs_sample(self) -> bool:
        return self._every(self.cfg.sample_every_steps)

    def needs_validation(self) -> bool:
        every = self.cfg.validate_every
        return self._every(self.cfg.save_steps if every is None else every)

    def requested(self, flag: threading.Event) -> bool:
        """Take a Sample now / Save now request (clearing it); at the last update the end of the run does both."""
        if self.pos.step >= self.total or not flag.is_set():
            return False
        flag.clear()
        return True

    def _every(self, steps: int) -> bool:
        """True every `steps` updates (0 = never), except at the last update, which the end of the run covers."""
        return bool(steps) and self.pos.step % steps == 0 and self.pos.step < self.total

    def validate(self) -> None:
        """The held-out loss now, as a 'validation' event (nothing when the run holds no samples out)."""
        loss = self.engine.validation_loss()
        self.validated_step = self.pos.step
        if loss is None:
            return
        if self.best_val is None or loss < self.best_val[0]:
            self.best_val = (loss, self.pos.step)
        self.events.emit("validation", step=self.pos.step, total=self.total, loss=loss,
                         message=f"Validation loss {loss:.4f} at step {self.pos.step} (best {self.best_val[0]:.4f} "
                                 f"at step {self.best_val[1]}).")

    def save_on_schedule(self, now: bool, seconds: float) -> None:
        """The checkpoint and the step adapter (beside the final one, same header) when due, or `now` (Save now)."""
        if self.needs_save() or now:
            self.save("requested" if now else "periodic")
        if self.needs_adapter() or now:
            self.export(seconds, name=f"{self.cfg.name}-step{self.pos.step:06d}")

    def export(self, seconds: float, extra: dict | None = None, name: str | None = None) -> list[Path]:
        """The adapter file(s) with the run's header (from the main process; the others export nothing)."""
        if not self.procs.is_main:
            return []
        with self.procs.whole_model(self.engine), self.weights.full_precision():
            metadata = {**export_metadata(self.cfg, self.engine, self.pos.step, seconds), **(extra or {})}
            return self.engine.export(self.out, metadata, name=name)

    def save(self, reason: str) -> Path | None:
        """A checkpoint (every process takes part; the main one writes it)."""
        training = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "loop_rng": self.rng.get_state(), "best_val": self.best_val,
                    **self.procs.checkpoint_state()}
        if not self.procs.is_main:
            return None
        with self.procs.whole_model(self.engine), self.weights.full_precision():
            adapter = self.engine.adapter_state()
        path = checkpoints.save_checkpoint(self.out, adapter, training, self.pos, self.cfg.checkpoints_total_limit)
        self.events.emit("checkpoint", step=self.pos.step, total=self.total,
                         message=f"Saved {reason} checkpoint {path.name}", path=str(path))
        return path

    def resume(self, resume_from: str) -> None:
        path = checkpoints.resolve_resume(resume_from, self.out)
        adapter, state, self.pos = checkpoints.load_checkpoint(path)
        self.procs.check_resume(state, path)
        with self.procs.whole_model(self.engine), self.weights.full_precision():
            self.engine.load_adapter_state(adapter)
        self.weights.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.rng.set_state(state["loop_rng"])
        self.best_val = state.get("best_val")  # absent in checkpoints from before validation existed
        checkpoints.restore_rng(self.procs.own_rng_state(state))
        self.events.emit("log", step=self.pos.step, total=self.total,
                         message=f"Resumed from {path} at step {self.pos.step}.")


def emit_samples(engine: Engine, cfg: RunConfig, out: Path, events: EventSink, step: int, total: int) -> None:
    if not cfg.sample_prompts:
        return
    engine.train_mode(False)
    try:
        with torch.no_grad():
            samples = engine.sample(cfg.sample_prompts, out / "samples", step)
    finally:
        engine.train_mode(True)
    events.emit("sample", step=step, total=total, message=f"{len(samples)} sample(s) at step {step}",
                samples=[{"prompt": s.prompt, "image": str(s.image_path) if s.image_path else None, "text": s.text}
                         for s in samples])


def export_metadata(cfg: RunConfig, engine: Engine, step: int, seconds: float) -> dict[str, str]:
    """Facts about the run for the adapter file's header, as kohya writes them (studio/export/metadata.py)."""
    return {**header_fields(cfg, engine.header_facts(), steps=step, samples=engine.num_samples(), seconds=seconds,
                            finished=time.time()), **engine.describe()}
