"""The Runs table (Train and Export tabs): every run and queued job of the workspace, and what can be done with one —
open it, duplicate its config into the Config tab, resume or continue it, reorder or remove a queued job, delete a run.

The rows come from the workspace's run index (studio/run_index.py), the same one `train.py` writes to. Actions go
through `studio.jobs` / `studio.index`; nothing here trains.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import gradio as gr
import pandas as pd

from studio.config import config_from_dict, parse_yaml, to_yaml
from studio.errors import StudioError
from studio.jobs import with_unique_name
from studio.run_index import QUEUED, RUNNING, RunRecord
from studio.ui.common import duration_text, note, ok, reports_errors
from studio.ui.config_tab import parse_config
from studio.ui.context import Studio

COLUMNS = ["run", "family", "status", "steps", "duration", "train loss", "best val loss", "adapter", "started"]


@dataclass
class RunsTable:
    table: gr.Dataframe
    selected: gr.Textbox  # the run the actions apply to (a click on a row picks it)
    opened: gr.Textbox  # set by "Open": the tab shows this run


def runs_table(studio: Studio, prefix: str, config_yaml: gr.Code | None = None) -> RunsTable:
    """The table and its actions; `config_yaml` (the Config tab's editor) receives a duplicated config."""
    with gr.Accordion("Runs", open=True, elem_id=f"{prefix}-runs"):
        table = gr.Dataframe(runs_frame(studio), headers=COLUMNS, interactive=False, wrap=False, max_height=320,
                             elem_id=f"{prefix}-runs-table")
        with gr.Row():
            selected = gr.Textbox(label="Selected run (click a row)", scale=2, elem_id=f"{prefix}-selected-run")
            refresh = gr.Button("↻", size="sm", elem_classes="refresh")
            open_run = gr.Button("Open", size="sm", elem_classes="runs-action")
            duplicate = gr.Button("Duplicate into Config", size="sm", visible=config_yaml is not None,
                                  elem_classes="runs-action")
            resume = gr.Button("Resume", size="sm", elem_classes="runs-action")
            more = gr.Number(100, label="more steps", precision=0, minimum=1, scale=0, min_width=110)
            extend = gr.Button("Continue", size="sm", elem_classes="runs-action")
        with gr.Row():
            up = gr.Button("↑ Earlier in queue", size="sm", elem_classes="runs-action")
            down = gr.Button("↓ Later in queue", size="sm", elem_classes="runs-action")
            remove = gr.Button("Remove from queue", size="sm", elem_classes="runs-action")
            delete = gr.Button("Delete run…", size="sm", variant="stop", elem_classes="runs-action")
            confirm = gr.Button("Yes, delete it and its files", size="sm", variant="stop", visible=False,
                                elem_classes="runs-action", elem_id=f"{prefix}-confirm-delete")
        message = gr.Markdown(elem_id=f"{prefix}-runs-message")
        opened = gr.Textbox(visible=False)

    table.select(_picked_row, table, selected, api_visibility="private")
    refresh.click(partial(runs_frame, studio), None, table, api_visibility="private")
    open_run.click(partial(open_selected, studio), selected, [message, opened], api_visibility="private")
    if config_yaml is not None:
        duplicate.click(partial(duplicate_run, studio), selected, [message, config_yaml], api_visibility="private")
    resume.click(partial(resume_run, studio), selected, message, api_visibility="private")
    extend.click(partial(continue_run, studio), [selected, more], message, api_visibility="private")
    up.click(partial(move_queued, studio, offset=-1), selected, message, api_visibility="private")
    down.click(partial(move_queued, studio, offset=1), selected, message, api_visibility="private")
    remove.click(partial(remove_queued, studio), selected, message, api_visibility="private")
    delete.click(partial(ask_delete, studio), selected, [message, confirm], api_visibility="private")
    confirm.click(partial(delete_run, studio), selected, [message, confirm], api_visibility="private")
    for action in (resume, extend, up, down, remove, confirm):  # the table shows what the action changed
        action.click(partial(runs_frame, studio), None, table, api_visibility="private")
    return RunsTable(table, selected, opened)


def register_api(studio: Studio) -> None:
    """The queue and runs for scripts: /queue_add /queue_list /queue_remove /queue_move /runs_list /delete_run.
    A StudioError reaches the caller as its message (gr.Error)."""

    def queue_add(config_yaml: str) -> dict:
        """Queue a config (YAML text); returns {"name": run name, "message": ...}. A taken name gets a suffix."""
        with _user_errors():
            return add_to_queue(studio, config_yaml)

    def queue_list() -> list[dict]:
        """The queued jobs in order: name, position, family, task_type."""
        return [{"name": r.name, "position": i, "family": r.family, "task_type": r.task_type}
                for i, r in enumerate(studio.index.queued())]

    def queue_remove(name: str) -> str:
        with _user_errors():
            studio.index.remove_queued(studio.index.run_folder(name).name)
        return f"Removed '{name}' from the queue."

    def queue_move(name: str, offset: int) -> list[dict]:
        """Move a queued job `offset` places (negative: earlier); returns the queue."""
        with _user_errors():
            studio.index.move(studio.index.run_folder(name).name, int(offset))
        return queue_list()

    def runs_list() -> list[dict]:
        """Every run and queued job with its status, steps, losses, adapter and times."""
        return [{k: v for k, v in asdict(r).items() if k != "config"} for r in studio.index.list()]

    def delete_run(name: str) -> str:
        """Delete a run's folder and record (refused while it runs; a name, never a path)."""
        with _user_errors():
            studio.index.delete(name)
            return f"Deleted '{studio.index.run_folder(name).name}'."

    for fn in (queue_add, queue_list, queue_remove, queue_move, runs_list, delete_run):
        gr.api(fn, api_name=fn.__name__)


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except StudioError as exc:
        raise gr.Error(str(exc)) from None


# --- the table -------------------------------------------------------------------------------------------------------

def runs_frame(studio: Studio) -> pd.DataFrame:
    places = {r.name: i for i, r in enumerate(studio.index.queued(), 1)}  # a queued job shows its turn: queued #2
    return pd.DataFrame([_row(r, places.get(r.name)) for r in studio.index.list()], columns=COLUMNS)


def _row(r: RunRecord, place: int | None = None) -> list:
    best = f"{r.best_val_loss:.4f} @ {r.best_val_step}" if r.best_val_loss is not None else ""
    status = f"{r.status} #{place}" if place else r.status
    return [r.name, r.family, status, f"{r.step}/{r.total}" if r.total else "",
            duration_text(r.seconds) if r.seconds is not None else "",
            f"{r.final_loss:.4f}" if r.final_loss is not None else "", best,
            _size(r.adapter_bytes) if r.adapter_bytes else "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started)) if r.started else ""]


def _picked_row(frame: pd.DataFrame, evt: gr.SelectData) -> str:
    return str(frame.iloc[evt.index[0]]["run"]) if evt.index is not None else gr.skip()


# --- actions ---------------------------------------------------------------------------------------------------------

def _record(studio: Studio, name: str) -> RunRecord:
    if not (name or "").strip():
        raise StudioError("Pick a run first: click its row in the Runs table.")
    name = studio.index.run_folder(name).name  # a name, not a path (studio.safe_names)
    record = studio.index.get(name)
    if record is None:
        raise StudioError(f"There is no run or queued job called '{name}'. Press ↻ to refresh the table.")
    return record


@reports_errors(outputs=2)
def open_selected(studio: Studio, name: str):
    record = _record(studio, name)
    return note(f"Showing '{record.name}' ({record.status})."), record.name


@reports_errors(outputs=2)
def duplicate_run(studio: Studio, name: str):
    """The run's config in the Config tab's editor under a free name (its own folder), ready to edit and start."""
    record = _record(studio, name)
    free = studio.index.unique_name(record.name)
    data = {**parse_yaml(record.config, f"the config of '{record.name}'"),
            "output_dir": str(studio.index.run_folder(free)), "output_name": None, "resume_from": None}
    cfg = config_from_dict(data, check_paths=False)
    return (ok(f"'{record.name}' copied into the Config tab as '{free}'. Edit it, then Start or queue it."),
            to_yaml(cfg))


@reports_errors(outputs=1)
def resume_run(studio: Studio, name: str):
    """Queue the run again from its latest checkpoint (an interrupted or stopped run)."""
    record = _record(studio, name)
    return _queue_again(studio, record, {})


@reports_errors(outputs=1)
def continue_run(studio: Studio, name: str, more):
    """Queue the run for `more` updates past where it ended, from its final checkpoint."""
    record = _record(studio, name)
    more = int(more or 0)
    if more < 1:
        raise StudioError("Give the number of more steps (1 or more).")
    return _queue_again(studio, record, {"max_train_steps": record.step + more})


def _queue_again(studio: Studio, record: RunRecord, changes: dict) -> str:
    if record.status in (QUEUED, RUNNING):
        raise StudioError(f"'{record.name}' is {record.status}; it can be resumed once it has ended.")
    folder = studio.index.run_folder(record.name)
    if not (folder / "checkpoints").is_dir():
        raise StudioError(f"'{record.name}' has no checkpoint to continue from. Duplicate it to train it again.")
    data = {**parse_yaml(record.config, f"the config of '{record.name}'"), "resume_from": "latest", **changes}
    studio.jobs.enqueue(config_from_dict(data))
    steps = f" until step {changes['max_train_steps']}" if "max_train_steps" in changes else ""
    return ok(f"'{record.name}' queued to continue from its latest checkpoint{steps}.")


@reports_errors(outputs=1)
def move_queued(studio: Studio, name: str, offset: int):
    studio.index.move(_record(studio, name).name, offset)
    queue = [r.name for r in studio.index.queued()]
    place = f": now #{queue.index(name) + 1} of {len(queue)}" if name in queue else ""
    return ok(f"Moved '{name}' {'earlier' if offset < 0 else 'later'} in the queue{place} (see the status column).")


@reports_errors(outputs=1)
def remove_queued(studio: Studio, name: str):
    studio.index.remove_queued(_record(studio, name).name)
    return ok(f"Removed '{name}' from the queue.")


@reports_errors(outputs=2)
def ask_delete(studio: Studio, name: str):
    record = _record(studio, name)
    if record.status == RUNNING:
        raise StudioError(f"'{record.name}' is running. Cancel it first, then delete it.")
    return (note(f"Delete '{record.name}' with its adapters, checkpoints and samples? This cannot be undone."),
            gr.update(visible=True))


@reports_errors(outputs=2)
def delete_run(studio: Studio, name: str):
    record = _record(studio, name)
    studio.index.delete(record.name)
    return ok(f"Deleted '{record.name}'."), gr.update(visible=False)


# --- shared with the API ---------------------------------------------------------------------------------------------

def prepared_config(studio: Studio, text: str):
    """(cfg, fitted, note): the YAML fitted to the card under a run name free now (a config resuming its own run
    keeps its name), and a note when the name changed. Queueing makes sure the name is still free (studio.jobs)."""
    fitted = parse_config(studio, text)
    cfg, renamed = with_unique_name(studio.index, fitted.cfg)
    return cfg, replace(fitted, cfg=cfg), renamed


def add_to_queue(studio: Studio, text: str) -> dict:
    cfg, fitted, renamed = prepared_config(studio, text)
    name = Path(studio.jobs.enqueue(cfg, fitted).output_dir).name
    if name != Path(cfg.output_dir).name:  # another studio queued that name since it was offered
        renamed = f"The run name '{Path(cfg.output_dir).name}' was taken a moment ago, so this run is '{name}'."
    return {"name": name, "message": f"{renamed} Queued '{name}'.".strip()}


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
