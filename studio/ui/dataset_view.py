"""What the Dataset tab shows of a dataset: thumbnails, the caption table, the validation report with a fix for each
problem that has one, and the files one can pick to delete or rename. `show_dataset` fills the tab's `view`."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data.captions import list_images, read_captions
from studio.data.dataset_files import CAPTION, DELETE_FILE, REMOVE_ROW
from studio.data.text import list_text_files, read_dataset
from studio.errors import StudioError
from studio.safe_names import cache_key
from studio.ui.common import error, ok
from studio.ui.context import Studio

GALLERY_LIMIT = 200
CAPTION_COLUMNS = ["filename", "caption"]
PROBLEM_COLUMNS = ["file", "problem", "fix"]
FIX_LABELS = {REMOVE_ROW: "Remove its row", DELETE_FILE: "Delete the file", CAPTION: "Write its caption"}
VIEW_SIZE = 6  # gallery, caption table, report, problem list, file picker, the gallery's file names (state)
REPORT_LIMIT = 100


def show_dataset(studio: Studio, value: str | None) -> tuple:
    """The view of a dataset: gallery, caption table, report, problem list, file picker, the gallery's names."""
    if not value:
        return _view([], _captions_frame({}), "", [], [], [])
    try:
        folder = studio.dataset_path(value)
    except StudioError as exc:
        return _view([], _captions_frame({}), error(exc), [], [], [])
    thumbnail_dir = studio.workspace.root / ".cache" / "thumbnails" / cache_key(folder)
    return _text_view(folder) if holds_text(folder) else _image_view(folder, thumbnail_dir)


def holds_text(folder: Path) -> bool:
    """A text (LLM) dataset: text files and no images."""
    return not list_images(folder) and bool(list_text_files(folder))


def fix_of(label: str) -> str | None:
    """The fix a problem row's label names."""
    return next((fix for fix, text in FIX_LABELS.items() if text == label), None)


def _view(gallery, captions, report, fixable, files, shown) -> tuple:
    problems = pd.DataFrame(fixable or [["", "", ""]], columns=PROBLEM_COLUMNS)
    return (gallery, captions, report, gr.update(value=problems, visible=bool(fixable)),
            gr.update(choices=files, value=[]), shown)


def _image_view(folder: Path, thumbnail_dir: Path) -> tuple:
    from studio.data.images import inspect_dataset  # loads torch: only when a dataset is shown
    from studio.data.thumbnails import thumbnails

    report = inspect_dataset(folder)
    try:
        captions = read_captions(folder)
    except StudioError:
        captions = {}  # the report says what is wrong with metadata.csv
    images = list_images(folder)
    thumbs = thumbnails(images[:GALLERY_LIMIT], thumbnail_dir)
    shown = [p.name for p in images[:GALLERY_LIMIT] if p.name in thumbs]  # unreadable ones are in the report
    gallery = [(str(thumbs[name]), captions.get(name) or "(no caption)") for name in shown]
    fixable = [[issue.file, _without_name(issue.message, issue.file), FIX_LABELS[issue.fix]]
               for issue in report.issues if issue.fix]
    markdown = _report_markdown([issue.message for issue in report.issues if not issue.fix], len(fixable),
                                f"{len(report.items)} image(s), all captioned and readable: ready to train.")
    return _view(gallery, _captions_frame({p.name: captions.get(p.name, "") for p in images}), markdown,
                 fixable[:REPORT_LIMIT], [p.name for p in images], shown)


def _text_view(folder: Path) -> tuple:
    report = read_dataset(folder)
    rows = [[r.source, _record_preview(r)] for r in report.records[:GALLERY_LIMIT]]
    frame = pd.DataFrame(rows or [["", ""]], columns=["sample", "text"])
    markdown = _report_markdown(report.problems, 0, f"{len(report.records)} text sample(s): ready to train.")
    return _view([], frame, markdown, [], [], [])


def _record_preview(record) -> str:
    if record.messages:
        return " / ".join(f"{m['role']}: {m['content']}" for m in record.messages if m["role"] != "system")[:300]
    return (record.text or "")[:300]


def _captions_frame(rows: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(list(rows.items()) or [["", ""]], columns=CAPTION_COLUMNS)


def _without_name(message: str, name: str) -> str:
    """A problem's message without its leading 'name: ' (the list shows the name in its own column)."""
    return message.removeprefix(f"{name}: ")


def _report_markdown(listed: list[str], fixable: int, fine: str) -> str:
    """The headline, then the problems without a one-click fix; those with one are in the problem list below."""
    total = len(listed) + fixable
    if not total:
        return ok(fine)
    text = f"### ⚠ {total} problem(s) — training will not start until they are fixed"
    if fixable:
        text += f"\n{fixable} with a fix in the list below: click a problem's row, then confirm its fix."
    if listed:
        text += "\n" + "\n".join(f"- {p}" for p in listed[:REPORT_LIMIT])
        text += f"\n- ... and {len(listed) - REPORT_LIMIT} more" if len(listed) > REPORT_LIMIT else ""
    return text
