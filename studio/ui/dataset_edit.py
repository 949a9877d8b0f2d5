"""Editing a dataset from the Dataset tab: the fix for each problem in the report (with a confirm step), and picking
images to delete (confirmed) or rename, or removing the caption rows of missing images. The file operations
themselves are studio.data.dataset_files; this module shows them.

Every edit goes through `editing`: a demo dataset is copied into workspace/datasets on its first edit and the edit
goes to the copy, so the demo stays as built (the copy is dropped again when the edit fails).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import gradio as gr

from studio.data import dataset_files
from studio.data.captions import read_captions
from studio.data.dataset_files import CAPTION, DELETE_FILE, REMOVE_ROW
from studio.errors import StudioError
from studio.ui.common import choices_update, note, ok, reports_errors
from studio.ui.context import Studio
from studio.ui.dataset_view import VIEW_SIZE, fix_of, show_dataset

EDIT_OUTPUTS = 2 + VIEW_SIZE  # status, the dataset picker, the view
_QUESTIONS = {  # what the confirm panel asks before a fix, and its button
    DELETE_FILE: ("Delete **{file}** and its caption? This cannot be undone.", "Delete {file}"),
    REMOVE_ROW: ("Remove the caption row of **{file}** (there is no such image)?", "Remove the row"),
    CAPTION: ("The caption of **{file}** (it replaces every row for it):", "Save the caption"),
}


# --- where an edit goes --------------------------------------------------------------------------------------------

@dataclass
class EditTarget:
    folder: Path
    value: str  # the dataset picker's value for `folder`
    copied_from: str = ""  # the demo dataset this is a fresh copy of


@contextmanager
def editing(studio: Studio, value: str) -> Iterator[EditTarget]:
    """The dataset an edit writes to: the picked one, or a fresh copy of a demo dataset (removed if the edit fails)."""
    folder = studio.dataset_path(value)
    if not studio.demo or folder.parent != studio.demo.images.parent:
        yield EditTarget(folder, value)
        return
    copy = dataset_files.copy_dataset(folder, studio.workspace.datasets)
    try:
        yield EditTarget(copy, f"datasets/{copy.name}", value)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise


def edited(studio: Studio, target: EditTarget, message: str) -> tuple:
    """The outputs after an edit: the status, the picker (moved to the copy if one was made), the refreshed view."""
    picker = gr.skip()
    if target.copied_from:
        message += "\n\n" + note(f"The demo dataset stays as built: this edit went to a copy, {target.value}.")
        picker = choices_update(studio.dataset_choices(), value=target.value)
    return (message, picker, *show_dataset(studio, target.value))


# --- components --------------------------------------------------------------------------------------------------

@dataclass
class ProblemFixer:
    """The problems that have a fix, one a row; a row opens the confirm panel under it."""
    problems: gr.Dataframe
    panel: gr.Group
    question: gr.Markdown
    caption: gr.Textbox
    file: gr.Textbox  # (hidden) the problem's file and fix: the confirm button's inputs
    fix: gr.Textbox
    apply: gr.Button
    cancel: gr.Button


def problem_fixer() -> ProblemFixer:
    problems = gr.Dataframe(headers=["file", "problem", "fix"], interactive=False, wrap=True, max_height=300,
                            column_widths=["22%", "58%", "20%"], visible=False, elem_id="dataset-problems",
                            label="Problems with a fix: click a row")
    with gr.Group(visible=False, elem_id="fix-panel") as panel:
        question = gr.Markdown()
        caption = gr.Textbox(show_label=False, visible=False, elem_id="fix-caption")
        file = gr.Textbox(visible="hidden")
        fix = gr.Textbox(visible="hidden")
        with gr.Row():
            apply = gr.Button(variant="primary", elem_id="fix-apply")
            cancel = gr.Button("Cancel")
    return ProblemFixer(problems, panel, question, caption, file, fix, apply, cancel)


@dataclass
class FileManager:
    """Pick images (in the list or by clicking thumbnails), then delete (confirmed) or rename them."""
    accordion: gr.Accordion
    picked: gr.Dropdown
    delete: gr.Button
    confirm: gr.Row
    confirm_text: gr.Markdown
    confirm_delete: gr.Button
    cancel_delete: gr.Button
    new_name: gr.Textbox
    rename: gr.Button
    remove_stale: gr.Button
    status: gr.Markdown  # under the buttons: what Delete, Rename and Remove did, or why not


def file_manager() -> FileManager:
    with gr.Accordion("Manage files (delete, rename, stale caption rows)", open=False,
                      elem_id="manage-files") as accordion:
        picked = gr.Dropdown([], multiselect=True, allow_custom_value=True, elem_id="picked-files",
                             label="Picked images (choose here, or click thumbnails)")
        with gr.Row(equal_height=True):
            delete = gr.Button("Delete the picked images…", variant="stop")
            new_name = gr.Textbox(label="New name for the picked image", placeholder="portrait 01.png", scale=2)
            rename = gr.Button("Rename")
            remove_stale = gr.Button("Remove caption rows of missing images")
        with gr.Row(visible=False, equal_height=True) as confirm:
            confirm_text = gr.Markdown()
            confirm_delete = gr.Button("Yes, delete", variant="stop", scale=0)
            cancel_delete = gr.Button("Cancel", scale=0)
        status = gr.Markdown(elem_id="manage-files-status")  # by the buttons that it answers
    return FileManager(accordion, picked, delete, confirm, confirm_text, confirm_delete, cancel_delete, new_name,
                       rename, remove_stale, status)


def wire_file_actions(studio: Studio, dataset: gr.Dropdown, status: gr.Markdown, view: list, gallery: gr.Gallery,
                      shown: gr.State, fixer: ProblemFixer, files: FileManager) -> None:
    outputs = [status, dataset, *view]
    answered_here = [files.status, dataset, *view]  # the file actions answer under their buttons
    hide = partial(gr.update, visible=False)

    def on_select(value: str, evt: gr.SelectData):  # (gradio finds `evt` by its annotation, which a partial hides)
        return select_problem(studio, value, evt)

    fixer.problems.select(on_select, dataset,
                          [fixer.panel, fixer.question, fixer.caption, fixer.file, fixer.fix, fixer.apply],
                          api_visibility="private")
    fixer.apply.click(partial(fix_problem, studio), [dataset, fixer.fix, fixer.file, fixer.caption], outputs,
                      api_name="fix_problem")
    # A question about the list as it was: the panel closes when the list changes (after a fix, or another dataset).
    for closes in (fixer.problems.change, fixer.cancel.click):
        closes(hide, None, fixer.panel, api_visibility="private")
    gallery.select(pick_image, [files.picked, shown], files.picked, api_visibility="private")
    files.delete.click(ask_delete, files.picked, [files.status, files.confirm, files.confirm_text],
                       api_visibility="private")
    files.confirm_delete.click(partial(delete_images, studio), [dataset, files.picked], answered_here,
                               api_name="delete_images")
    for closes in (files.picked.change, files.cancel_delete.click):
        closes(hide, None, files.confirm, api_visibility="private")
    files.rename.click(partial(rename_image, studio), [dataset, files.picked, files.new_name],
                       [*answered_here, files.new_name], api_name="rename_image")
    files.remove_stale.click(partial(remove_stale_rows, studio), dataset, answered_here, api_name="remove_stale_rows")


# --- handlers ----------------------------------------------------------------------------------------------------

def select_problem(studio: Studio, value: str, evt: gr.SelectData):
    """Open the confirm panel for the clicked problem's fix (a caption fix shows the caption to edit)."""
    file, message, label = (list(evt.row_value or []) + ["", "", ""])[:3]
    fix = fix_of(label)
    if fix is None:
        return (gr.skip(),) * 6
    question, button = (text.format(file=file) for text in _QUESTIONS[fix])
    caption = gr.update(visible=False)
    if fix == CAPTION:
        try:
            current = read_captions(studio.dataset_path(value)).get(file, "")
        except StudioError:
            current = ""
        caption = gr.update(visible=True, value=current, placeholder=f"a caption for {file}")
    return (gr.update(visible=True), f"{file}: {message}\n\n{question}", caption, file, fix,
            gr.update(value=button))


@reports_errors(outputs=EDIT_OUTPUTS)
def fix_problem(studio: Studio, value: str, fix: str, file: str, caption: str):
    with editing(studio, value) as target:
        done = dataset_files.apply_fix(target.folder, fix, file, caption or "")
    return edited(studio, target, ok(done))


def pick_image(picked: list[str] | None, shown: list[str], evt: gr.SelectData) -> list[str]:
    """A clicked thumbnail joins the picked images."""
    picked = list(picked or [])
    name = shown[evt.index] if isinstance(evt.index, int) and evt.index < len(shown) else None
    return picked + [name] if name and name not in picked else picked


@reports_errors(outputs=3)
def ask_delete(picked: list[str] | None):
    if not picked:
        raise StudioError("Pick the images to delete first (in the list, or by clicking their thumbnails).")
    names = ", ".join(picked[:10]) + (f" and {len(picked) - 10} more" if len(picked) > 10 else "")
    return (gr.skip(), gr.update(visible=True),
            f"Delete {len(picked)} image(s) and their captions: {names}? This cannot be undone.")


@reports_errors(outputs=EDIT_OUTPUTS)
def delete_images(studio: Studio, value: str, names: list[str] | None):
    if not names:
        raise StudioError("Pick the images to delete first (in the list, or by clicking their thumbnails).")
    with editing(studio, value) as target:
        deleted = dataset_files.delete_images(target.folder, list(names))
    return edited(studio, target, ok(f"Deleted {len(deleted)} image(s) and their captions: {', '.join(deleted)}."))


@reports_errors(outputs=EDIT_OUTPUTS + 1)  # and the name box: cleared after a rename, kept when refused
def rename_image(studio: Studio, value: str, picked: list[str] | str | None, new_name: str):
    picked = [picked] if isinstance(picked, str) else list(picked or [])
    if len(picked) != 1:
        raise StudioError(f"Pick exactly one image to rename ({len(picked)} are picked).")
    if not (new_name or "").strip():
        raise StudioError(f"Type the new name for {picked[0]}.")
    with editing(studio, value) as target:
        renamed = dataset_files.rename_image(target.folder, picked[0], new_name)
    return (*edited(studio, target, ok(f"Renamed {picked[0]} to {renamed}; its caption followed.")), "")


@reports_errors(outputs=EDIT_OUTPUTS)
def remove_stale_rows(studio: Studio, value: str):
    with editing(studio, value) as target:
        removed = dataset_files.remove_rows(target.folder)
        if not removed:
            raise StudioError("No caption row names a missing image: there is nothing to remove.")
    return edited(studio, target, ok(f"Removed {len(removed)} caption row(s) of missing images: "
                                     f"{', '.join(removed)}."))
