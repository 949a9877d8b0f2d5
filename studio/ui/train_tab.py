"""Train tab: start / cancel the one background job (studio.jobs.JobRunner) and watch it — progress, ETA, loss curve,
log, samples. A timer polls the job's snapshot, so reloading the page reattaches to a running job."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.errors import StudioError
from studio.jobs import JobState
from studio.ui.common import error, note, ok, reports_errors
from studio.ui.config_tab import parse_config
from studio.ui.context import Studio

POLL_SECONDS = 1.0
# Keeps the log scrolled to its newest line, unless the reader scrolled up (then it waits until they are back at the
# end). Gradio 6's own Textbox autoscroll does not follow value updates from the server.
FOLLOW_LOG_JS = """() => setTimeout(() => {
  const box = document.querySelector('#train-log textarea');
  if (!box) return;  // the Train tab is not shown
  if (!box.dataset.follow) {
    box.dataset.follow = '1';
    box.addEventListener('scroll', () => {
      box.dataset.follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 4 ? '1' : '0';
    });
  }
  if (box.dataset.follow === '1') box.scrollTop = box.scrollHeight;
}, 100)"""
STATUS_TEXT = {"idle": "No training yet", "running": "Training", "stopping": "Stopping at the next step",
               "done": "Finished", "stopped": "Stopped", "failed": "Failed"}


@dataclass
class TrainTab:
    status: gr.Markdown


def train_tab(studio: Studio, config_yaml: gr.Code) -> TrainTab:
    with gr.Tab("Train", id="train"):
        gr.Markdown("Trains the config from the **Config** tab in the background. One job at a time; you can "
                    "close or reload the page, the job keeps running.")
        with gr.Row():
            start = gr.Button("▶ Start training", variant="primary", elem_id="start-training")
            stop = gr.Button("■ Cancel", variant="stop", elem_id="stop-training")
        action = gr.Markdown(elem_id="train-action")
        status = gr.Markdown(elem_id="train-status")
        progress = gr.HTML(_progress_html(JobState()), elem_id="train-progress")
        with gr.Row():
            losses = gr.LinePlot(_loss_frame(JobState()), x="step", y="loss", title="Training loss", height=280,
                                 scale=3, elem_id="loss-plot")
            samples = gr.Gallery(label="Samples", columns=3, height=280, scale=2, elem_id="train-samples")
        replies = gr.Markdown(elem_id="train-replies")
        log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, interactive=False, elem_id="train-log")
        commands = gr.Markdown(elem_id="train-commands")
        seen = gr.State(None)  # what this page shows already; an unchanged job is not redrawn
        timer = gr.Timer(POLL_SECONDS)

        def training_status() -> dict:
            """The job's snapshot as plain data (status, step, total, it_per_s, eta_s, losses, log, samples, files)."""
            return asdict(studio.jobs.snapshot())

        gr.api(training_status, api_name="training_status")

    view = [status, progress, losses, samples, replies, log, commands, seen]
    # The last start's message (often an error) is cleared first: it must not sit under the new start's progress.
    start.click(None, None, action, js="() => ''").then(partial(start_training, studio), config_yaml, action,
                                                           api_name="start_training")
    stop.click(partial(stop_training, studio), None, action, api_name="stop_training")
    timer.tick(partial(poll, studio), seen, view, show_progress="hidden", api_visibility="private").then(
        None, js=FOLLOW_LOG_JS)
    return TrainTab(status)


# --- handlers --------------------------------------------------------------------------------------------------------

@reports_errors(outputs=1)
def start_training(studio: Studio, text: str):
    fitted = parse_config(studio, text)
    cfg = fitted.cfg
    out = Path(cfg.output_dir)
    if (out / "config.yaml").is_file() and not cfg.resume_from and not studio.jobs.running:
        raise StudioError(f"{out.name} already holds a run. Give this one another run name in the Config tab, "
                          "or add `resume_from: latest` to continue it.")
    studio.jobs.start(cfg, fitted)  # refuses with a message while another job runs
    return ok(f"Started '{cfg.name}'. Progress shows below; outputs go to {cfg.output_dir}.")


def stop_training(studio: Studio):
    if studio.jobs.stop():
        return note("Cancelling: the job stops after the current step and saves a checkpoint.")
    return note("No training is running.")


def poll(studio: Studio, seen):
    """Everything the tab shows about the job; skipped (no redraw) while nothing changed since `seen`."""
    state = studio.jobs.snapshot()
    key = (state.status, state.step, len(state.log), len(state.samples))
    if key == seen:
        return [gr.skip()] * 8
    images = _sample_images(state)
    return (_status_markdown(state), _progress_html(state), _loss_frame(state),
            gr.update(value=images, visible=bool(images) or not state.samples),
            _sample_replies(state), "\n".join(state.log), _commands(state), key)


# --- views -----------------------------------------------------------------------------------------------------------

def _status_markdown(state: JobState) -> str:
    text = STATUS_TEXT.get(state.status, state.status)
    if state.status == "idle":
        return note(f"{text}. Fill a config in the Config tab, then press Start.")
    if state.status == "failed":
        return error(state.error or "Training failed; see the log.")
    name = f" **{html.escape(state.name)}**"
    if state.status in ("done", "stopped"):
        adapter = f" Adapter: `{state.files[0]}`" if state.files else ""
        return ok(f"{text}{name} at step {state.step}/{state.total}.{adapter}")
    return f"… {text}{name}"


def _progress_html(state: JobState) -> str:
    total = max(state.total, 1)
    parts = [f"step {state.step}/{state.total or '?'}"]
    if state.it_per_s:
        parts.append(f"{state.it_per_s:.2f} it/s")
    if state.eta_s is not None and state.status in ("running", "stopping"):
        parts.append(f"ETA {_duration(state.eta_s)}")
    if state.losses:
        parts.append(f"loss {state.losses[-1][1]:.4f}")
    if state.peak_gb is not None or state.planned_gb is not None:
        peak = f"GPU peak {state.peak_gb:.1f} GB" if state.peak_gb is not None else "memory"
        parts.append(peak + (f" (planned {state.planned_gb:.1f} GB)" if state.planned_gb is not None else ""))
    return (f"<div class='studio-progress'><progress value='{min(state.step, total)}' max='{total}'></progress>"
            f"<span>{' · '.join(parts)}</span></div>")


def _loss_frame(state: JobState) -> pd.DataFrame:
    """Numeric columns even when empty: the plot picks its axis types from the first value it gets."""
    steps, losses = zip(*state.losses) if state.losses else ((), ())
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(losses, dtype="float64")})


def _sample_images(state: JobState) -> list:
    return [(s["image"], f"{Path(s['image']).stem}: {s.get('prompt', '')}") for s in state.samples
            if s.get("image") and Path(s["image"]).is_file()]


def _sample_replies(state: JobState) -> str:
    replies = [s for s in state.samples if s.get("text") is not None]
    if not replies:
        return ""
    lines = [f"- step {s.get('step', '?')}, **{html.escape(s.get('prompt', ''))}** → "
             f"{html.escape(s['text']) or '*(an empty reply)*'}" for s in replies[-8:]]
    return "**Sample replies** (newest last)\n" + "\n".join(lines)


def _commands(state: JobState) -> str:
    if not state.output_dir:
        return ""
    out = state.output_dir
    return ("**From a terminal:** watch it in TensorBoard with "
            f"`tensorboard --logdir {out}/logs`; rerun it with `python train.py --config {out}/config.yaml`.")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
