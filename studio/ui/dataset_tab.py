"""Dataset tab: create or pick a dataset, upload files, see thumbnails with captions, edit captions, auto-label, and
the validation report — the same checks training runs before its first step — with a fix for each problem; delete
and rename images (studio.ui.dataset_edit). What a dataset looks like here is studio.ui.dataset_view."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data.dataset_files import UPLOAD_SUFFIXES, UploadResult, add_uploads, save_caption_table
from studio.errors import StudioError
from studio.ui.common import choices_update, note, ok, reports_errors
from studio.ui.context import Studio
from studio.ui.dataset_edit import EDIT_OUTPUTS, edited, editing, file_manager, problem_fixer, wire_file_actions
from studio.ui.dataset_view import CAPTION_COLUMNS, holds_text, show_dataset
from studio.ui.dataset_health import health_section
from studio.ui.tag_editor import tag_editor_section

CAPTIONS_LABEL = "Captions (edit, then save)"
LABEL_MODES = [("BLIP caption + CLIP tags", "caption+tags"), ("BLIP caption", "caption"), ("CLIP tags", "tags"),
               ("WD14 tagger tags (anime, characters)", "wd14"),
               ("VLM caption (Qwen-VL, SmolVLM, Florence-2, JoyCaption)", "vlm"),
               ("VLM caption + WD14 tags", "vlm+wd14")]


@dataclass
class DatasetTab:
    dataset: gr.Dropdown  # value: the dataset folder relative to the workspace root
    view: list  # what show_dataset fills: gallery, caption table, report, problem list, file picker, gallery names
    image_only: list  # what only an image dataset shows (image_controls): gallery, save, auto-label, file
    # management; and last the table, whose header and editability change

    def on_page_load(self, app: gr.Blocks, studio: Studio) -> None:
        """Show the preselected dataset when the page opens, not an empty tab under a picked dataset."""
        app.load(partial(show_dataset, studio), self.dataset, self.view, api_visibility="private")
        app.load(partial(image_controls, studio), self.dataset, self.image_only, api_visibility="private")
        app.load(partial(refresh_datasets, studio), self.dataset, self.dataset, api_visibility="private")


def dataset_tab(studio: Studio) -> DatasetTab:
    choices = _label_model_choices(studio)
    with gr.Tab("Dataset", id="dataset") as tab:
        gr.Markdown("A dataset is a folder of images with captions (`metadata.csv` or a `.txt` beside each image), "
                    "or `.txt`/`.jsonl`/`.json` files for an LLM. The demo datasets are ready to use.")
        with gr.Row(equal_height=True):
            # The demo's image dataset first, as the Config tab's demo preset uses it; else gradio's first choice.
            dataset = gr.Dropdown(studio.dataset_choices(), value=_first_dataset(studio), label="Dataset", scale=3,
                                  allow_custom_value=True, elem_id="dataset-picker")
            refresh = gr.Button("↻ Refresh", size="sm", scale=0, elem_classes="refresh")
            new_name = gr.Textbox(label="New dataset name", placeholder="my_style", scale=2)
            create = gr.Button("Create", scale=0)
        # The validation report right under the picker: it is what one reads first after picking a dataset.
        report = gr.Markdown(elem_id="dataset-report")
        fixer = problem_fixer()
        status = gr.Markdown(elem_id="dataset-status")
        upload = gr.UploadButton("⬆ Upload images or text files", file_count="multiple",
                                 file_types=UPLOAD_SUFFIXES, elem_id="dataset-upload")
        with gr.Row():
            gallery = gr.Gallery(label="Images", columns=4, height=420, object_fit="contain", scale=3,
                                 elem_id="dataset-gallery")
            with gr.Column(scale=2):
                table = gr.Dataframe(headers=CAPTION_COLUMNS, label=CAPTIONS_LABEL,
                                     interactive=True, static_columns=[0], wrap=True, max_height=380,
                                     column_widths=["35%", "65%"],
                                     elem_id="caption-table")
                save = gr.Button("Save captions", elem_id="save-captions")
        shown = gr.State([])  # the file names of the gallery's thumbnails, in order
        files = file_manager()
        labelling = _auto_label_section(choices)
        health_section(studio, dataset)
        tag_edits = tag_editor_section(studio, dataset)

    view = [gallery, table, report, fixer.problems, files.picked, shown]
    for edit in tag_edits:  # the caption table shows what a bulk edit wrote (a later Save keeps it)
        edit.then(partial(show_dataset, studio), dataset, view, api_visibility="private")
    image_only = [gallery, save, labelling.accordion, files.accordion, table]
    dataset.change(partial(show_dataset, studio), dataset, view, api_name="show_dataset")
    dataset.change(partial(image_controls, studio), dataset, image_only, api_visibility="private")
    refresh.click(partial(refresh_datasets, studio), dataset, dataset, api_name="list_datasets")
    tab.select(partial(refresh_datasets, studio), dataset, dataset, api_visibility="private")  # made elsewhere since
    create.click(partial(create_dataset, studio), new_name, [status, dataset, new_name], api_name="create_dataset")
    edit_outputs = [status, dataset, *view]
    # Unprocessed, so the handler sees each file's own name (gradio's copy drops some characters from it).
    upload.upload(partial(add_files, studio), [dataset, upload], edit_outputs, api_name="upload_files",
                  preprocess=False).then(partial(image_controls, studio), dataset, image_only,
                                         api_visibility="private")  # the upload decides the kind
    save.click(partial(save_captions, studio), [dataset, table], edit_outputs, api_name="save_captions")
    labelling.button.click(partial(auto_label, studio), [dataset, *labelling.options],
                           [labelling.status, *edit_outputs[1:]], api_name="auto_label",
                           show_progress_on=labelling.status)  # the progress too: not over the gallery
    wire_file_actions(studio, dataset, status, view, gallery, shown, fixer, files)
    return DatasetTab(dataset, view, image_only)


@dataclass
class AutoLabelControls:
    accordion: gr.Accordion
    button: gr.Button
    status: gr.Markdown  # the answer and the progress, right by the button
    options: list  # the inputs of auto_label after the dataset, in its parameter order


def _auto_label_section(choices: dict) -> AutoLabelControls:
    with gr.Accordion("Auto-label (BLIP / VLM captions, CLIP / WD14 tags)", open=False,
                      elem_id="auto-label") as accordion:
        with gr.Row():
            mode = gr.Dropdown(LABEL_MODES, value="caption+tags", label="What to write")
            trigger = gr.Textbox(label="Trigger word (put first)", placeholder="sks_style")
            overwrite = gr.Checkbox(label="Replace existing captions")
        with gr.Row():
            clip_model = gr.Dropdown(choices["clip"], value=choices["clip"][0][1], allow_custom_value=True,
                                     label="CLIP model (hub id or folder)")
            blip_model = gr.Dropdown(choices["blip"], value=choices["blip"][0][1], allow_custom_value=True,
                                     label="BLIP model (hub id or folder)")
        with gr.Row():  # WD14 tagger
            wd14_model = gr.Dropdown(choices["wd14"], value=choices["wd14"][0][1], allow_custom_value=True,
                                     label="WD14 tagger (hub id or folder with model.onnx + selected_tags.csv)")
            general_threshold = gr.Slider(0, 1, value=choices["general_threshold"], step=0.01,
                                          label="WD14 general tag threshold")
            character_threshold = gr.Slider(0, 1, value=choices["character_threshold"], step=0.01,
                                            label="WD14 character tag threshold")
        with gr.Row():  # VLM
            vlm_model = gr.Dropdown(choices["vlm"], value=choices["vlm"][0][1], allow_custom_value=True,
                                    label="VLM (image-text-to-text hub id or folder)")
            instruction = gr.Textbox(value=choices["instruction"], label="VLM instruction (Florence-2: a task "
                                                                        "prompt such as <DETAILED_CAPTION>)")
        label_button = gr.Button("Auto-label", variant="primary", elem_id="auto-label-button")
        label_status = gr.Markdown(elem_id="auto-label-status")  # by the button that it answers
    return AutoLabelControls(accordion, label_button, label_status,
                             [mode, overwrite, trigger, clip_model, blip_model, wd14_model, general_threshold,
                              character_threshold, vlm_model, instruction])


def _first_dataset(studio: Studio) -> str | None:
    if studio.demo:
        return str(studio.demo.images.relative_to(studio.workspace.root))
    choices = studio.dataset_choices()
    return choices[0][1] if choices else None


def _label_model_choices(studio: Studio) -> dict:
    """Model choices per captioner, and the WD14 / VLM defaults (these modules load transformers)."""
    from studio.data.label_models import DEFAULT_BLIP, DEFAULT_CLIP
    from studio.data.vlm import DEFAULT_INSTRUCTION, SUGGESTED_VLMS
    from studio.data.wd14 import DEFAULT_CHARACTER_THRESHOLD, DEFAULT_GENERAL_THRESHOLD, DEFAULT_WD14
    choices = {"clip": [(f"{DEFAULT_CLIP['clip']} (download)", DEFAULT_CLIP["clip"])],
               "blip": [(f"{DEFAULT_BLIP} (download)", DEFAULT_BLIP)],
               "wd14": [(f"{DEFAULT_WD14} (download)", DEFAULT_WD14)],
               "vlm": [(f"{model} (download; {note})", model) for model, note in SUGGESTED_VLMS.items()],
               "general_threshold": DEFAULT_GENERAL_THRESHOLD, "character_threshold": DEFAULT_CHARACTER_THRESHOLD,
               "instruction": DEFAULT_INSTRUCTION}
    if studio.demo:
        choices["clip"].append(("tiny demo CLIP (offline, random labels)", str(studio.demo.clip)))
        choices["blip"].append(("tiny demo BLIP (offline, random labels)", str(studio.demo.blip)))
    return choices


# --- handlers --------------------------------------------------------------------------------------------------------

def refresh_datasets(studio: Studio, current: str | None):
    return choices_update(studio.dataset_choices(), keep=current)


@reports_errors(outputs=3)
def create_dataset(studio: Studio, name: str):
    """The new dataset, picked; the name box cleared for the next one (kept when the name is refused)."""
    value = studio.create_dataset(name)
    return ok(f"Created {value}. Upload images (with captions, or auto-label them) or text files."), \
        choices_update(studio.dataset_choices(), value=value), ""


def image_controls(studio: Studio, value: str | None):
    """Gallery, 'Save captions', Auto-label and file management are for images: a text dataset hides them, and its
    table is a read-only list of samples (a new, empty dataset shows the image controls)."""
    try:
        text = bool(value) and holds_text(studio.dataset_path(value))
    except StudioError:
        text = False
    table = gr.update(label="Samples (read-only)", interactive=False) if text else \
        gr.update(label=CAPTIONS_LABEL, interactive=True)
    return (*[gr.update(visible=not text)] * 4, table)


@reports_errors(outputs=EDIT_OUTPUTS)
def add_files(studio: Studio, value: str, files: list[dict] | None):
    """Uploads (gradio's file records: a temporary path and the user's file name) into the dataset."""
    uploads = [(f["path"], f.get("orig_name") or Path(f["path"]).name) for f in files or []]
    with editing(studio, value) as target:
        result = add_uploads(target.folder, uploads)
    return edited(studio, target, _upload_message(result, target.value))


def _upload_message(result: UploadResult, value: str) -> str:
    message = ok(f"Added {len(result.added)} file(s) to {value}.")
    if result.captions:
        message += f" Took {result.captions} caption(s) from the uploaded metadata.csv / .txt files."
    if result.renamed:
        pairs = ", ".join(f"{old} → {new}" for old, new in list(result.renamed.items())[:5])
        message += "\n\n" + note(f"Renamed {len(result.renamed)} file(s) to names every file system accepts "
                                 f"(captions follow): {pairs}.")
    if result.skipped:
        message += "\n\n" + note(f"Skipped {len(result.skipped)} file(s) of other types "
                                 f"({', '.join(result.skipped[:5])}); accepted: {', '.join(UPLOAD_SUFFIXES)} (CSV "
                                 "only as metadata.csv).")
    return message + "".join("\n\n" + note(text) for text in result.notes)


@reports_errors(outputs=EDIT_OUTPUTS)
def save_captions(studio: Studio, value: str, table: pd.DataFrame | None):
    rows = table.values.tolist() if table is not None else []
    with editing(studio, value) as target:
        saved = save_caption_table(target.folder, rows)
    return edited(studio, target, ok(f"Saved {saved} changed caption(s) in {target.value}."))


@reports_errors(outputs=EDIT_OUTPUTS)
def auto_label(studio: Studio, value: str, mode: str, overwrite: bool, trigger: str, clip_model: str,
               blip_model: str, wd14_model: str, general_threshold: float, character_threshold: float,
               vlm_model: str, instruction: str, progress=gr.Progress()):
    from studio.data.captioning import LabelModels, auto_label as label_images  # loads torch/transformers

    progress(0, desc="Loading the labelling models...")

    def report_progress(done: int, total: int, per_s: float) -> None:
        progress((done, total), desc=f"Labelling ({per_s:.1f} images/s)", unit="images")

    models = LabelModels(clip_model=clip_model or None, blip_model=blip_model or None, wd14_model=wd14_model or None,
                         general_threshold=general_threshold, character_threshold=character_threshold,
                         vlm_model=vlm_model or None, instruction=instruction or "")
    with editing(studio, value) as target:
        result = label_images(target.folder, mode=mode, overwrite=bool(overwrite), trigger_word=trigger or "",
                              models=models, progress=report_progress)
    return edited(studio, target, ok(result.summary().replace("\n", "  \n")))
