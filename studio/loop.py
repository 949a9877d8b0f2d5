"""The one training loop, for every task: `train(cfg, events, stop)`.

Read top to bottom: set up (device, engine, optimizer, schedule), maybe resume, then micro-batches with gradient
accumulation until the step budget is spent or a stop is requested, with samples and checkpoints on the way, then
the export. What differs between image and text training lives in the engine (studio/engines/).
"""

from __future__ import annotations

import math
import random
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from studio import checkpoints
from studio.checkpoints import Position
from studio.config import RunConfig, save_config
from studio.engines import make_engine
from studio.engines.base import Engine
from studio.errors import StudioError
from studio.events import EventSink
from studio.hardware import autocast_dtype, pick_device
from studio.tensorboard_log import TensorBoardListener


@dataclass
class RunResult:
    output_dir: Path
    files: list[Path] = field(default_factory=list)
    step: int = 0
    total_steps: int = 0
    stopped: bool = False
    last_loss: float | None = None


def train(cfg: RunConfig, events: EventSink | None = None, stop: threading.Event | None = None) -> RunResult:
    """Run a training job to the end (or to a stop request). Every outcome is also an event."""
    events = events or EventSink()
    stop = stop or threading.Event()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    events.open_jsonl(out / "events.jsonl")
    save_config(cfg, out / "config.yaml")  # `train.py --config output_dir/config.yaml` reproduces the run
    try:
        return _run(cfg, out, events, stop)
    except StudioError as exc:
        events.emit("failed", message=str(exc))
        raise
    except Exception as exc:
        events.emit("failed", message=f"Training failed: {type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc())
        raise
    finally:
        events.close_jsonl()


def _run(cfg: RunConfig, out: Path, events: EventSink, stop: threading.Event) -> RunResult:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    autocast = autocast_dtype(cfg.mixed_precision, device)
    engine = make_engine(cfg, device, autocast, events)
    events.emit("log", message=f"Loading {cfg.base_model} on {device.type}...")
    engine.load()

    accum = cfg.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(engine.batches(0)) / accum)
    total = cfg.max_train_steps or cfg.epochs * updates_per_epoch
    optimizer = build_optimizer(cfg, engine.param_groups(), device)
    scheduler = build_scheduler(cfg, optimizer, total)
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    rng = torch.Generator().manual_seed(cfg.seed)  # noise and timesteps are drawn from here (saved in checkpoints)
    pos = Position()

    if cfg.resume_from:
        path = checkpoints.resolve_resume(cfg.resume_from, out)
        adapter, state, pos = checkpoints.load_checkpoint(path)
        engine.load_adapter_state(adapter)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rng.set_state(state["loop_rng"])
        checkpoints.restore_rng(state["rng"])
        events.emit("log", step=pos.step, total=total, message=f"Resumed from {path} at step {pos.step}.")

    def save(reason: str) -> Path:
        training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "loop_rng": rng.get_state()}
        path = checkpoints.save_checkpoint(out, engine.adapter_state(), training, pos, cfg.checkpoints_total_limit)
        events.emit("checkpoint", step=pos.step, total=total, message=f"Saved {reason} checkpoint {path.name}",
                    path=str(path))
        return path

    tensorboard = TensorBoardListener(cfg.logging_dir or out / "logs")
    events.listeners.append(tensorboard)
    events.emit("start", step=pos.step, total=total, message=f"Training {total} steps "
                f"({engine.num_samples()} samples/epoch, batch {cfg.batch_size} x {accum} accumulation).",
                output_dir=str(out))
    started, start_step, last_loss, stopped = time.time(), pos.step, None, False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    engine.train_mode(True)
    try:
        while pos.step < total and not stopped:
            batches = engine.batches(pos.epoch)
            group_losses: list[torch.Tensor] = []
            for i in range(pos.batch_in_epoch, len(batches)):
                # --- one micro-batch: forward under autocast, backward of loss/accum ---------------------------
                batch = engine.collate(batches[i], pos.epoch)
                with torch.autocast(device.type, dtype=autocast) if autocast else nullcontext():
                    loss = engine.loss(batch, rng)
                scaler.scale(loss / accum).backward()
                group_losses.append(loss.detach())  # read once per update: .item() syncs a GPU
                pos.batch_in_epoch = i + 1
                if pos.batch_in_epoch % accum and pos.batch_in_epoch < len(batches):
                    continue
                # --- one update: unscale, clip, step ---------------------------------------------------------
                if cfg.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pos.step += 1
                last_loss = torch.stack(group_losses).float().mean().item()
                group_losses = []
                rate = (pos.step - start_step) / max(time.time() - started, 1e-9)
                events.emit("progress", step=pos.step, total=total, loss=last_loss, lr=scheduler.get_last_lr()[0],
                            epoch=pos.epoch, it_per_s=rate, eta_s=(total - pos.step) / rate if rate else None)
                # --- samples, checkpoints, stop requests: only at update boundaries ---------------------------
                if cfg.sample_every_steps and pos.step % cfg.sample_every_steps == 0 and pos.step < total:
                    emit_samples(engine, cfg, out, events, pos.step, total)
                if stop.is_set():
                    stopped = True
                    break
                if cfg.save_steps and pos.step % cfg.save_steps == 0 and pos.step < total:
                    save("periodic")
                if pos.step >= total:
                    break
            else:
                pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0

        save("stop" if stopped else "final")
        if not stopped:
            emit_samples(engine, cfg, out, events, pos.step, total)
        files = engine.export(out, export_metadata(cfg, engine, pos.step, time.time() - started))
    finally:
        events.listeners.remove(tensorboard)
        tensorboard.close()
    result = RunResult(out, files, pos.step, total, stopped, last_loss)
    events.emit("stopped" if stopped else "done", step=pos.step, total=total,
                message=f"{'Stopped' if stopped else 'Finished'} at step {pos.step}/{total}. Adapter: {files[0]}",
                files=[str(f) for f in files])
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: RunConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise StudioError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes). Use optimizer: adamw here.")
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total: int):
    from diffusers.optimization import get_scheduler
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=total)


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
    """Facts about the run for the adapter file's header (kohya's `ss_` names where they exist)."""
    return {
        "ss_base_model": Path(cfg.base_model).name, "ss_network_dim": str(cfg.lora_rank),
        "ss_network_alpha": str(cfg.effective_alpha), "ss_resolution": str(cfg.resolution),
        "ss_steps": str(step), "ss_num_train_images": str(engine.num_samples()),
        "ss_training_time_s": f"{seconds:.1f}", "ss_learning_rate": str(cfg.learning_rate),
        "ss_seed": str(cfg.seed), "studio_task": cfg.task_type, **engine.describe(),
    }
