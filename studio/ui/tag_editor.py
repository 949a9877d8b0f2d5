"""Dataset tab, tag editor: bulk add / remove / replace tags on every image or those a search selects, the trigger
word first, tags sorted by frequency, undo of the last bulk edit, and the tag-frequency table
(studio.data.tag_editor does the work)."""

from __future__ import annotations

from functools import partial

import gradio as gr
import pandas as pd

from studio.data.tag_editor import OPERATIONS, bulk_edit, tag_table, undo_last_edit
from studio.errors import StudioError
from studio.ui.common import choices_update, error, note, ok, reports_errors
from studio.ui.context import Studio
from studio.ui.dataset_edit import editing

TAG_COLUMNS = ["tag", "images"]


def tag_editor_section(studio: Studio, dataset: gr.Dropdown) -> list:
    """The tag editor under the dataset picker; returns the events that change captions, so the tab can refresh
    its caption table after them."""
    with gr.Accordion("Tag editor (bulk edits)", open=False, elem_id="tag-editor"):
        gr.Markdown("Edits the captions' comma-separated tags in metadata.csv (or the `.txt` captions) of every "
                    "image, or only of the images with the searched tags. **Undo** reverts the last bulk edit.")
        with gr.Row():
            search = gr.Textbox(label="Only images with these tags", placeholder="1girl, -blurry (empty: all images)",
                                info="comma-separated; -tag: images without it", elem_id="tag-search")
            operation = gr.Dropdown([(label, name) for name, label in OPERATIONS.items()], value="add",
                                    label="Edit", elem_id="tag-operation")
            tag = gr.Textbox(label="Tag(s)", placeholder="masterpiece, best quality",
                             info="add / remove: one or more; replace: the old tag; trigger: the word")
            new_tag = gr.Textbox(label="Replace with", placeholder="high quality", info="replace only")
        with gr.Row():
            apply = gr.Button("Apply to the selected images", variant="primary", elem_id="tag-apply")
            undo = gr.Button("Undo the last bulk edit", elem_id="tag-undo")
            refresh = gr.Button("↻ Count tags", elem_id="tag-count")
        status = gr.Markdown(elem_id="tag-status")
        table = gr.Dataframe(headers=TAG_COLUMNS, label="Tags by frequency (of the selected images)",
                             interactive=False, max_height=320, elem_id="tag-table")

    edit = apply.click(partial(apply_edit, studio), [dataset, operation, tag, new_tag, search],
                       [status, table, dataset], api_name="tags_bulk_edit")
    reverted = undo.click(partial(undo_edit, studio), [dataset, search], [status, table], api_name="tags_undo")
    refresh.click(partial(tag_frequencies, studio), [dataset, search], [status, table], api_name="tag_frequencies")
    search.submit(partial(tag_frequencies, studio), [dataset, search], [status, table], api_visibility="private")
    # Another dataset: its table. The line keeps an edit's message when the edit moved the picker to a demo's copy;
    # a dataset the user picks clears it.
    dataset.change(lambda value, find: tag_frequencies(studio, value, find)[1], [dataset, search], table,
                   api_visibility="private")
    dataset.input(lambda: "", None, status, api_visibility="private")
    return [edit, reverted]


@reports_errors(outputs=3)
def apply_edit(studio: Studio, value: str, operation: str, tag: str, new_tag: str, search: str):
    """The bulk edit; on a demo dataset it goes to a copy (the picker moves there), the demo stays as built."""
    with editing(studio, value) as target:
        result = bulk_edit(target.folder, operation, tag or "", new_tag or "", search or "")
    message = ok(result.summary())
    if target.copied_from:
        message += "\n\n" + note(f"The demo dataset stays as built: this edit went to a copy, {target.value}.")
    picker = choices_update(studio.dataset_choices(), value=target.value) if target.copied_from else gr.skip()
    return message, _frame(tag_table(target.folder, search or "")), picker


@reports_errors(outputs=2)
def undo_edit(studio: Studio, value: str, search: str):
    folder = studio.dataset_path(value)
    message = undo_last_edit(folder)
    return ok(message), _frame(tag_table(folder, search or ""))


def tag_frequencies(studio: Studio, value: str | None, search: str):
    """The tag table of the picked dataset; for a dataset without images, an empty table and why."""
    if not value:
        return "", _frame([])
    try:
        return "", _frame(tag_table(studio.dataset_path(value), search or ""))
    except StudioError as exc:
        return error(exc), _frame([])


def _frame(rows: list[tuple[str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=TAG_COLUMNS)
