"""Train tab: start, queue and cancel jobs of the one background trainer (studio.jobs.JobRunner) and watch one —
progress, ETA, training and validation loss, log, samples — with the Runs table below. A timer polls the job's
state, so reloading the page reattaches to a running job; an opened run shows its own state, never another's."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.jobs import JobState
from studio.ui.common import duration_text, error, note, ok, reports_errors
from studio.ui.context import Studio
from studio.ui.replace_guard import ReplaceGuard
from studio.ui.runs_table import add_to_queue, prepared_config, runs_frame, runs_table

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
STATUS_TEXT = {"idle": "No training yet", "queued": "Queued", "running": "Training",
               "stopping": "Stopping at the next step", "done": "Finished", "stopped": "Stopped", "failed": "Failed",
               "interrupted": "Interrupted"}
VIEW_OUTPUTS = 12
CANCEL_NOTE = note("Cancelling: the job stops after the current step and saves a checkpoint.")
SERIES_COLOURS = {"train": "#f97316", "validation": "#2563eb"}


@dataclass
class TrainTab:
    status: gr.Markdown


def train_tab(studio: Studio, config_yaml: gr.Code, guard: ReplaceGuard) -> TrainTab:
    """`guard`: the Config tab's; Start and Add to queue refuse a YAML whose replacement it refused."""
    with gr.Tab("Train", id="train"):
        gr.Markdown("Trains the config from the **Config** tab in the background, one job at a time: **Start** runs "
                    "it now, **Add to queue** after the jobs before it. You can close or reload the page; jobs keep "
                    "running, and queued ones survive a restart of the studio.")
        with gr.Row():
            start = gr.Button("▶ Start training", variant="primary", elem_id="start-training")
            queue = gr.Button("+ Add to queue", elem_id="queue-training")
            stop = gr.Button("■ Cancel", variant="stop", elem_id="stop-training")
            sample_now = gr.Button("Sample now", size="sm", elem_id="sample-now")
            save_now = gr.Button("Save now", size="sm", elem_id="save-now")
        action = gr.Markdown(elem_id="train-action")
        status = gr.Markdown(elem_id="train-status")
        progress = gr.HTML(_progress_html(JobState()), elem_id="train-progress")
        with gr.Row():
            losses = gr.LinePlot(_loss_frame(JobState()), x="step", y="loss", color="series", title="Loss",
                                 color_map={}, height=280, scale=3, elem_id="loss-plot")
            samples = gr.Gallery(label="Samples", columns=3, height=280, scale=2, object_fit="contain",
                                 elem_id="train-samples")  # a sample shown whole, not cropped to its tile
        replies = gr.Markdown(elem_id="train-replies")
        log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, interactive=False, elem_id="train-log")
        commands = gr.Markdown(elem_id="train-commands")
        runs = runs_table(studio, "train", config_yaml)
        seen = gr.State(None)  # what this page shows already; an unchanged job is not redrawn
        series = gr.State([])  # the loss plot's series (train, validation)
        timer = gr.Timer(POLL_SECONDS)

        def training_status(run: str = "") -> dict:
            """A job's state as plain data (status, step, total, it_per_s, eta_s, losses, val_losses, log, samples,
            files, error): the run named, or the current (last) job."""
            return asdict(studio.jobs.state_of(run) if run else studio.jobs.snapshot())

        gr.api(training_status, api_name="training_status")

    view = [status, progress, losses, samples, replies, log, commands, start, runs.table, seen, series, action]
    # The last start's message (often an error) is cleared first: it must not sit under the new start's progress.
    # Starting or queueing shows the current job again (an opened run is no longer pinned).
    for button, handler, api_name in ((start, start_training, "start_training"),
                                      (queue, queue_training, "queue_training")):
        cleared = button.click(None, None, [action, runs.opened], js="() => ['', '']")
        guard.training(cleared, config_yaml, action).success(partial(handler, studio), config_yaml, action,
                                                              api_name=api_name)
    stop.click(partial(stop_training, studio), None, action, api_name="stop_training")
    sample_now.click(partial(request_now, studio, "sample"), None, action, api_name="sample_now")
    save_now.click(partial(request_now, studio, "save"), None, action, api_name="save_now")
    timer.tick(partial(poll, studio), [runs.opened, seen, action], view, show_progress="hidden",
               api_visibility="private").then(None, js=FOLLOW_LOG_JS).then(
        loss_colours, series, losses, show_progress="hidden", api_visibility="private")
    return TrainTab(status)


# --- handlers --------------------------------------------------------------------------------------------------------

@reports_errors(outputs=1)
def start_training(studio: Studio, text: str):
    cfg, fitted, renamed = prepared_config(studio, text)
    studio.jobs.start(cfg, fitted)  # refuses with a message while another job trains
    return ok(f"{renamed} Started '{cfg.name}'. Progress shows below; outputs go to {cfg.output_dir}.".strip())


@reports_errors(outputs=1)
def queue_training(studio: Studio, text: str):
    queued = add_to_queue(studio, text)
    return ok(f"{queued['message']} It starts when the jobs before it have ended (see Runs).")


def stop_training(studio: Studio):
    if studio.jobs.stop():
        return CANCEL_NOTE
    return note("No training is running.")


@reports_errors(outputs=1)
def request_now(studio: Studio, what: str):
    """Sample now / Save now: a flag the loop reads after the current update."""
    if studio.jobs.request(what):
        return note("Rendering samples after the current step." if what == "sample" else
                    "Saving a checkpoint and the adapter so far after the current step.")
    return note("No training is running.")


def poll(studio: Studio, opened: str, seen, action: str = ""):
    """Everything the tab shows about the job it follows (the opened run, else the current one), and the Runs table;
    skipped (no redraw) while nothing changed since `seen`. A 'Cancelling' note goes once no job is stopping."""
    state = studio.jobs.state_of(opened) if opened else studio.jobs.snapshot()
    table = runs_frame(studio)
    key = (state.run, state.status, state.step, len(state.log), len(state.samples), len(state.val_losses),
           studio.jobs.busy, table.to_json())
    if key == seen:
        return [gr.skip()] * VIEW_OUTPUTS
    images = _sample_images(state)
    frame = _loss_frame(state)
    return (_status_markdown(state), _progress_html(state), frame,
            gr.update(value=images, visible=bool(images) or not state.samples),
            _sample_replies(state), "\n".join(state.log), _commands(state),
            gr.update(interactive=not studio.jobs.busy), table, key, sorted(frame["series"].unique()),
            "" if action == CANCEL_NOTE and not studio.jobs.busy else gr.skip())


# --- views -----------------------------------------------------------------------------------------------------------

def _status_markdown(state: JobState) -> str:
    text = STATUS_TEXT.get(state.status, state.status)
    if state.status == "idle":
        return note(f"{text}. Fill a config in the Config tab, then press Start.")
    if state.status == "failed":
        return error(f"{state.name}: {state.error}" if state.error else "Training failed; see the log.")
    if state.status == "interrupted":
        return error(f"{state.name} was interrupted: {state.error} Select it under Runs and press Resume.")
    if state.status == "queued":
        return note(f"{text}: **{html.escape(state.name)}** starts when the jobs before it have ended.")
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
        parts.append(f"ETA {duration_text(state.eta_s)}")
    if state.losses:
        parts.append(f"loss {state.losses[-1][1]:.4f}")
    if state.peak_gb is not None or state.planned_gb is not None:
        peak = f"GPU peak {state.peak_gb:.1f} GB" if state.peak_gb is not None else "memory"
        parts.append(peak + (f" (planned {state.planned_gb:.1f} GB)" if state.planned_gb is not None else ""))
    return (f"<div class='studio-progress'><progress value='{min(state.step, total)}' max='{total}'></progress>"
            f"<span>{' · '.join(parts)}</span></div>")


def _loss_frame(state: JobState) -> pd.DataFrame:
    """Training and validation loss, one series each; numeric columns even when empty: the plot picks its axis types
    from the first value it gets."""
    points = [(s, v, "train") for s, v in state.losses] + [(s, v, "validation") for s, v in state.val_losses]
    steps, losses, series = zip(*points) if points else ((), (), ())
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(losses, dtype="float64"),
                         "series": pd.Series(series, dtype="object")})


def loss_colours(series: list[str] | None) -> dict:
    """A colour for each series the plot holds, set after its data. Gradio's plot takes its colour scale from the
    data only when it rebuilds its chart, which new data alone does not do (a plot first drawn empty — a freshly
    loaded page — then draws its lines without a colour); a changed colour map does, with the data it holds then."""
    return gr.update(color_map={name: SERIES_COLOURS[name] for name in series or []})


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
