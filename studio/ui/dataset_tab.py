"""Dataset tab: create or pick a dataset, upload files, see thumbnails with captions, edit captions, auto-label, and
the validation report — the same checks training runs before its first step."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data.captions import IMAGE_SUFFIXES, list_images, metadata_path_for, read_captions, write_csv_captions
from studio.data.text import TEXT_SUFFIXES, list_text_files, read_dataset
from studio.errors import StudioError
from studio.ui.common import choices_update, error, note, ok, reports_errors
from studio.ui.context import Studio

UPLOAD_SUFFIXES = sorted(IMAGE_SUFFIXES | set(TEXT_SUFFIXES) | {".csv"})
GALLERY_LIMIT = 200
CAPTION_COLUMNS = ["filename", "caption"]
CAPTIONS_LABEL = "Captions (edit, then save)"
LABEL_MODES = [("BLIP caption + CLIP tags", "caption+tags"), ("BLIP caption", "caption"), ("CLIP tags", "tags")]


@dataclass
class DatasetTab:
    dataset: gr.Dropdown  # value: the dataset folder relative to the workspace root
    view: list  # what show_dataset fills: gallery, caption table, validation report
    image_only: list  # what only an image dataset shows (image_controls): gallery, save, auto-label, table header

    def on_page_load(self, app: gr.Blocks, studio: Studio) -> None:
        """Show the preselected dataset when the page opens, not an empty tab under a picked dataset."""
        app.load(partial(show_dataset, studio), self.dataset, self.view, api_visibility="private")
        app.load(partial(image_controls, studio), self.dataset, self.image_only, api_visibility="private")


def dataset_tab(studio: Studio) -> DatasetTab:
    clip_choices, blip_choices = _label_model_choices(studio)
    with gr.Tab("Dataset", id="dataset"):
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
                save = gr.Button("Save captions to metadata.csv", elem_id="save-captions")
        with gr.Accordion("Auto-label (BLIP captions / CLIP tags)", open=False, elem_id="auto-label") as labelling:
            with gr.Row():
                mode = gr.Dropdown(LABEL_MODES, value="caption+tags", label="What to write")
                trigger = gr.Textbox(label="Trigger word (put first)", placeholder="sks_style")
                overwrite = gr.Checkbox(label="Replace existing captions")
            with gr.Row():
                clip_model = gr.Dropdown(clip_choices, value=clip_choices[0][1], allow_custom_value=True,
                                         label="CLIP model (hub id or folder)")
                blip_model = gr.Dropdown(blip_choices, value=blip_choices[0][1], allow_custom_value=True,
                                         label="BLIP model (hub id or folder)")
            label_button = gr.Button("Auto-label", variant="primary", elem_id="auto-label-button")

    view = [gallery, table, report]
    image_only = [gallery, save, labelling, table]
    dataset.change(partial(show_dataset, studio), dataset, view, api_name="show_dataset")
    dataset.change(partial(image_controls, studio), dataset, image_only, api_visibility="private")
    refresh.click(partial(refresh_datasets, studio), dataset, dataset, api_name="list_datasets")
    create.click(partial(create_dataset, studio), new_name, [status, dataset], api_name="create_dataset")
    upload.upload(partial(add_files, studio), [dataset, upload], [status, *view], api_name="upload_files").then(
        partial(image_controls, studio), dataset, image_only, api_visibility="private")  # the upload decides the kind
    save.click(partial(save_captions, studio), [dataset, table], [status, *view], api_name="save_captions")
    label_button.click(partial(auto_label, studio), [dataset, mode, overwrite, trigger, clip_model, blip_model],
                       [status, *view], api_name="auto_label")
    return DatasetTab(dataset, view, image_only)


def _first_dataset(studio: Studio) -> str | None:
    if studio.demo:
        return str(studio.demo.images.relative_to(studio.workspace.root))
    choices = studio.dataset_choices()
    return choices[0][1] if choices else None


def _label_model_choices(studio: Studio) -> tuple[list, list]:
    from studio.data.label_models import DEFAULT_BLIP, DEFAULT_CLIP  # (this module loads transformers)
    clip = [(f"{DEFAULT_CLIP['clip']} (download)", DEFAULT_CLIP["clip"])]
    blip = [(f"{DEFAULT_BLIP} (download)", DEFAULT_BLIP)]
    if studio.demo:
        clip.append(("tiny demo CLIP (offline, random labels)", str(studio.demo.clip)))
        blip.append(("tiny demo BLIP (offline, random labels)", str(studio.demo.blip)))
    return clip, blip


# --- handlers --------------------------------------------------------------------------------------------------------

def refresh_datasets(studio: Studio, current: str | None):
    return choices_update(studio.dataset_choices(), keep=current)


@reports_errors(outputs=2)
def create_dataset(studio: Studio, name: str):
    value = studio.create_dataset(name)
    return ok(f"Created {value}. Upload images (with captions, or auto-label them) or text files."), \
        choices_update(studio.dataset_choices(), value=value)


def show_dataset(studio: Studio, value: str | None):
    """Gallery, caption table and validation report for a dataset."""
    if not value:
        return [], _captions_frame({}), ""
    try:
        folder = studio.dataset_path(value)
    except StudioError as exc:
        return [], _captions_frame({}), error(exc)
    return _text_view(folder) if _holds_text(folder) else _image_view(folder)


def image_controls(studio: Studio, value: str | None):
    """Gallery, 'Save captions' and Auto-label are for images: a text dataset hides them, and its table is a read-only
    list of samples (a new, empty dataset shows the image controls)."""
    try:
        text = bool(value) and _holds_text(studio.dataset_path(value))
    except StudioError:
        text = False
    table = gr.update(label="Samples (read-only)", interactive=False) if text else \
        gr.update(label=CAPTIONS_LABEL, interactive=True)
    return gr.update(visible=not text), gr.update(visible=not text), gr.update(visible=not text), table


@reports_errors(outputs=4)
def add_files(studio: Studio, value: str, files: list[str] | None):
    folder = studio.dataset_path(value)
    added, skipped = [], []
    for upload in files or []:
        name = _safe_filename(Path(upload).name)
        suffix = Path(name).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES or (suffix == ".csv" and name != "metadata.csv"):
            skipped.append(Path(upload).name)
            continue
        target = studio.workspace.resolve(folder / name)
        if target.parent != folder:
            raise StudioError(f"{name} would land outside the dataset folder.")
        shutil.copyfile(upload, target)
        added.append(name)
    message = ok(f"Added {len(added)} file(s) to {value}.")
    if skipped:
        message += "\n\n" + note(f"Skipped {len(skipped)} file(s) of other types ({', '.join(skipped[:5])}); "
                                 f"accepted: {', '.join(UPLOAD_SUFFIXES)} (CSV only as metadata.csv).")
    return (message, *show_dataset(studio, value))


@reports_errors(outputs=4)
def save_captions(studio: Studio, value: str, table: pd.DataFrame | None):
    folder = studio.dataset_path(value)
    images = {p.name for p in list_images(folder)}
    if not images:
        raise StudioError(f"{value} holds no images: only image datasets have captions.")
    try:
        captions = read_captions(folder)
    except StudioError:
        captions = {}  # a broken metadata.csv: the table replaces it
    rows = table.values.tolist() if table is not None else []
    captions.update({str(name).strip(): str(caption or "").strip() for name, caption in rows
                     if str(name).strip() in images})
    path = write_csv_captions(metadata_path_for(folder), captions)
    return (ok(f"Saved {len(captions)} caption(s) to {path.relative_to(studio.workspace.root)}."),
            *show_dataset(studio, value))


@reports_errors(outputs=4)
def auto_label(studio: Studio, value: str, mode: str, overwrite: bool, trigger: str, clip_model: str,
               blip_model: str, progress=gr.Progress()):
    from studio.data.captioning import auto_label as label_images  # loads torch/transformers on first use

    folder = studio.dataset_path(value)
    progress(0, desc="Loading the labelling models...")

    def report_progress(done: int, total: int, per_s: float) -> None:
        progress((done, total), desc=f"Labelling ({per_s:.1f} images/s)", unit="images")

    result = label_images(folder, mode=mode, overwrite=bool(overwrite), trigger_word=trigger or "",
                          clip_model=clip_model or None, blip_model=blip_model or None, progress=report_progress)
    return (ok(result.summary().replace("\n", "  \n")), *show_dataset(studio, value))


# --- views -----------------------------------------------------------------------------------------------------------

def _holds_text(folder: Path) -> bool:
    """A text (LLM) dataset: text files and no images."""
    return not list_images(folder) and bool(list_text_files(folder))


def _image_view(folder: Path):
    from studio.data.images import inspect_dataset  # loads torch: only when a dataset is shown

    report = inspect_dataset(folder)
    try:
        captions = read_captions(folder)
    except StudioError:
        captions = {}
    images = list_images(folder)
    rows = {p.name: captions.get(p.name, "") for p in images}
    gallery = [(str(p), captions.get(p.name) or "(no caption)") for p in images[:GALLERY_LIMIT]]
    return gallery, _captions_frame(rows), _report_markdown(report.problems, f"{len(report.items)} image(s), "
                                                            "all captioned and readable: ready to train.")


def _text_view(folder: Path):
    report = read_dataset(folder)
    rows = [[r.source, _record_preview(r)] for r in report.records[:GALLERY_LIMIT]]
    frame = pd.DataFrame(rows or [["", ""]], columns=["sample", "text"])
    return [], frame, _report_markdown(report.problems, f"{len(report.records)} text sample(s): ready to train.")


def _record_preview(record) -> str:
    if record.messages:
        return " / ".join(f"{m['role']}: {m['content']}" for m in record.messages if m["role"] != "system")[:300]
    return (record.text or "")[:300]


def _captions_frame(rows: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(list(rows.items()) or [["", ""]], columns=CAPTION_COLUMNS)


def _report_markdown(problems: list[str], fine: str) -> str:
    if not problems:
        return ok(fine)
    listing = "\n".join(f"- {p}" for p in problems[:100])
    more = f"\n- ... and {len(problems) - 100} more" if len(problems) > 100 else ""
    return f"### ⚠ {len(problems)} problem(s) — training will not start until they are fixed\n{listing}{more}"


def _safe_filename(name: str) -> str:
    """The upload's base name with anything but letters, digits, '.', '-' and '_' replaced (no path parts)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".")
    return cleaned or "upload"
