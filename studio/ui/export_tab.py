"""Export tab: a run's adapters (the final one and those saved at steps along the way; the picked one is exported,
downloaded and inspected), its header (family, rank, alpha, steps... as a table), the run's files as download links,
copying an image LoRA into a WebUI/ComfyUI LoRA folder, and merging an LLM adapter into its base model (the merged
folder is offered as a zip)."""

from __future__ import annotations

import html
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from studio.errors import StudioError
from studio.export.install import folder_hint, install_lora, prompt_tag
from studio.run_adapters import step_of
from studio.ui.adapter_header import header_table
from studio.ui.common import choices_update, error, note, ok, reports_errors
from studio.ui.context import RunInfo, Studio
from studio.ui.runs_table import runs_frame, runs_table

FILE_LIMIT = 60
ADAPTER_ZIP = "-adapter"  # an LLM adapter folder <name>/ downloads as <name>-adapter.zip


def export_tab(studio: Studio) -> None:
    with gr.Tab("Export", id="export") as tab:
        with gr.Row(equal_height=True):
            run = gr.Dropdown(studio.run_choices(), label="Run", scale=3, allow_custom_value=True, elem_id="export-run")
            adapter = gr.Dropdown([], label="Adapter: the final one, or one saved at a step", scale=2,
                                  allow_custom_value=True, elem_id="export-adapter")
            refresh = gr.Button("↻ Refresh", size="sm", scale=0)
        status = gr.Markdown(elem_id="export-status")
        with gr.Row():
            with gr.Column(scale=3):
                header = gr.Markdown(elem_id="export-header")
                # Download links, not a gr.File: its "×" only hides a file from the list but reads as "delete".
                listing = gr.HTML(elem_id="export-files", css_template=LISTING_CSS, js_on_load=None)
            with gr.Column(scale=2):
                download = gr.DownloadButton("⬇ Download the adapter", visible=False, elem_id="export-download")
                with gr.Group(visible=False) as install_group:
                    lora_dir = gr.Textbox(label="Copy the LoRA into this WebUI / ComfyUI folder",
                                          placeholder="~/stable-diffusion-webui/models/Lora or ~/ComfyUI/models/loras")
                    overwrite = gr.Checkbox(label="Replace a file of the same name")
                    install_button = gr.Button("Copy into the LoRA folder", elem_id="export-install")
                    check_path = gr.Textbox(label="Check that a LoRA file loads completely on this run's base model",
                                            placeholder="empty: this run's adapter; or the path of any "
                                                        ".safetensors LoRA", elem_id="export-check-path")
                    check_button = gr.Button("Run the self-test", elem_id="export-check")
                merge_button = gr.Button("Merge the adapter into its base model", visible=False,
                                         elem_id="export-merge")
        files = gr.JSON(visible=False)  # the listed files' paths: /export_run's second output for API clients
        runs = runs_table(studio, "export")

    # The adapter is the last input of each API call, so scripts that name only the run get its final adapter.
    outputs = [status, files, download, install_group, merge_button]
    shown = (partial(show_run, studio), [run, adapter], outputs)
    details = (partial(show_run_details, studio), [run, adapter], [header, listing])
    adapters = (partial(adapter_choices, studio), [run, adapter], adapter)  # keeps the picked one
    run.change(partial(adapter_choices, studio), run, adapter, api_visibility="private").then(
        *shown, api_name="export_run").then(*details, api_name="export_details")
    adapter.input(*shown, api_visibility="private").then(*details, api_visibility="private")
    # "Open" in the Runs table picks that run here (its finished adapter, if it has one).
    runs.opened.change(lambda name: name or gr.skip(), runs.opened, run, api_visibility="private")
    tab.select(partial(runs_frame, studio), None, runs.table, api_visibility="private")
    for trigger in (refresh.click, tab.select):  # the dropdown shows a run from the start: show it, up to date
        trigger(partial(refresh_runs, studio), run, run, api_visibility="private").then(
            *adapters, api_visibility="private").then(*shown, api_visibility="private").then(
            *details, api_visibility="private")
    install_button.click(partial(install, studio), [run, lora_dir, overwrite, adapter], status,
                         api_name="install_lora")
    merge_button.click(partial(merge_into_base, studio), [run, adapter], outputs, api_name="merge_adapter").then(
        *details, api_visibility="private")
    check_button.click(partial(self_test, studio), [run, check_path, adapter], status, api_name="check_lora")


# --- handlers --------------------------------------------------------------------------------------------------------

def refresh_runs(studio: Studio, current: str | None):
    return choices_update(studio.run_choices(), keep=current)


def adapter_choices(studio: Studio, name: str | None, current: str | None = None):
    """The run's adapters, "step 400" … "final"; picked: `current` if the run has it, else the newest."""
    try:
        adapters = studio.run(name).adapters if name else []
    except StudioError:
        adapters = []  # show_run says why
    names = [adapter.path.name for adapter in adapters]
    return gr.update(choices=[(adapter.label, adapter.path.name) for adapter in adapters],
                     value=current if current in names else (names[-1] if names else None))


def picked(studio: Studio, name: str, adapter: str | None) -> RunInfo:
    """The run with the picked adapter (its file or folder name; empty: the newest, the final one once the run has
    finished) as `adapter`: every action of this tab applies to it."""
    info = studio.run(name)
    if not adapter:
        return replace(info, adapter=info.adapters[-1].path) if info.adapters else info
    chosen = next((a for a in info.adapters if a.path.name == adapter), None)
    if chosen is None:
        raise StudioError(f"'{name}' has no adapter called {adapter}. Pick one from the Adapter list.")
    return replace(info, adapter=chosen.path)


@reports_errors(outputs=5)
def show_run(studio: Studio, name: str | None, adapter: str | None = None):
    """Summary, files and download of a run; the install controls for image LoRAs, merge for LLM adapters."""
    if not name:
        return "", [], *[gr.update(visible=False)] * 3
    info = picked(studio, name, adapter)
    download = _download_target(info.adapter)
    if merged := _merged_folder(info):
        _download_target(merged, archive_suffix="")  # <run>-merged.zip, listed with the run's files
    finished = info.adapter is not None
    return (_run_summary(studio, info), _run_files(info),
            gr.update(value=str(download), visible=True) if download else gr.update(visible=False),
            gr.update(visible=finished and info.is_image), gr.update(visible=finished and not info.is_image))


def show_run_details(studio: Studio, name: str | None, adapter: str | None = None) -> tuple[str, str]:
    """The adapter's header as a table and the run's files as download links (after show_run made the zips)."""
    try:
        info = picked(studio, name, adapter) if name else None
    except StudioError:
        info = None  # show_run has already said why
    if info is None:
        return "", ""
    return header_table(info), _file_links(info, _run_files(info))


@reports_errors(outputs=1)
def install(studio: Studio, name: str, lora_dir: str, overwrite: bool, adapter: str | None = None):
    info = picked(studio, name, adapter)
    if not info.is_image or info.adapter is None:
        raise StudioError(f"'{name}' has no image LoRA to install ({info.status}). Pick a finished image run.")
    target = install_lora(info.adapter, lora_dir, overwrite=bool(overwrite))
    hint = folder_hint(lora_dir)
    copied = ok(f"Copied to {target}. In a prompt: `{prompt_tag(target)}`" + (f"\n\n{note(hint)}" if hint else ""))
    return f"{copied}\n\n{_run_summary(studio, info)}"  # the run's summary stays on the page


@reports_errors(outputs=1)
def self_test(studio: Studio, name: str, path: str, adapter: str | None = None):
    """The export self-test of the run's adapter, or of any LoRA file, against the run's base model."""
    from studio.export.selftest import check_against_base  # loads diffusers on first use

    info = picked(studio, name, adapter)
    if not info.is_image:
        raise StudioError(f"'{name}' is an LLM run; the self-test checks image LoRAs. Pick an image run.")
    target = Path(path.strip()) if path and path.strip() else info.adapter
    if target is None:
        raise StudioError(f"'{name}' has no adapter yet ({info.status}); give the path of a LoRA file to check.")
    test = check_against_base(target, info.base_model, allow_unsafe_pickle=info.allow_unsafe_pickle)
    text = f"{target.name}: {test.summary()}"
    return ok(text) if test.ok else error(text)


@reports_errors(outputs=5)
def merge_into_base(studio: Studio, name: str, adapter: str | None = None):
    from studio.export.peft_merge import merge_adapter  # loads transformers/peft on first use

    info = picked(studio, name, adapter)
    if info.is_image or info.adapter is None or not info.adapter.is_dir():
        raise StudioError(f"'{name}' is not a finished LLM run; merging applies to LLM adapters. Image LoRAs "
                          "are used as they are (see 'Copy into the LoRA folder').")
    target = info.folder / _merged_names(info)[0]
    merge_adapter(info.adapter, target, base_model=info.base_model or None)
    summary, *rest = show_run(studio, name, adapter)
    return (ok(f"Merged into {target.relative_to(studio.workspace.root)}: a full model that loads with "
               "`AutoModelForCausalLM.from_pretrained` without peft.") + "\n\n" + summary, *rest)


# --- views -----------------------------------------------------------------------------------------------------------

def _run_summary(studio: Studio, info: RunInfo) -> str:
    kind = "image LoRA" if info.is_image else "LLM adapter"
    lines = [f"**{info.name}** — {kind}, {info.status}; base model `{info.base_model}`"]
    step = step_of(info.adapter) if info.adapter is not None else None
    if step is not None:
        lines.append(note(f"This is the adapter saved at step {step}; pick another one in the Adapter list."))
    if info.adapter is None:
        lines.append(note("No adapter yet: the run has not finished." if info.status in ("running", "unknown") else
                          f"No adapter: the run {info.status} before it exported one."))
    elif info.is_image:
        lines.append(f"Adapter `{info.adapter.name}`: copy it into `stable-diffusion-webui/models/Lora` or "
                     f"`ComfyUI/models/loras` and prompt `{prompt_tag(info.adapter)}`; in diffusers, "
                     f"`pipe.load_lora_weights(\"{info.adapter.name}\")`.")
    else:
        lines.append(f"Adapter folder `{info.adapter.name}/`: `PeftModel.from_pretrained(base, \"{info.adapter}\")`, "
                     "or merge it into the base model below.")
    lines.append(f"Reproduce: `python train.py --config {info.folder / 'config.yaml'}` · "
                 f"TensorBoard: `tensorboard --logdir {info.folder / 'logs'}`")
    return "\n\n".join(lines)


def _run_files(info: RunInfo) -> list[str]:
    """The files worth downloading: the adapter (an adapter folder as its zip) and the merged model's zip first, then
    the other top-level files, the adapter folder's files, and the samples."""
    files = [p for p in sorted(info.folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    main = [p for p in (info.adapter, _archive(info.adapter, ADAPTER_ZIP), _archive(_merged_folder(info), ""))
            if p is not None and p in files]
    files = main + [p for p in files if p not in main]
    if info.adapter is not None and info.adapter.is_dir():
        files += sorted(p for p in info.adapter.iterdir() if p.is_file())
    samples = info.folder / "samples"
    if samples.is_dir():
        files += sorted(p for p in samples.iterdir() if p.is_file())
    return [str(p) for p in files[:FILE_LIMIT]]


def _merged_names(info: RunInfo) -> list[str]:
    """Where the LLM adapter's merged model goes, first the Merge button's folder: for the final adapter
    <run>-merged/, and <adapter>-merged/ from save_merged_model (the same unless the run set an output_name); for an
    adapter saved at a step, <adapter>-merged/."""
    final = info.adapter is None or step_of(info.adapter) is None
    names = [info.name] * final + ([info.adapter.name] if info.adapter is not None else [])
    return [f"{name}-merged" for name in dict.fromkeys(names)]


def _merged_folder(info: RunInfo) -> Path | None:
    """The LLM adapter's merged model, if there is one."""
    folders = [info.folder / name for name in _merged_names(info)]
    return next((f for f in folders if f.is_dir()), None) if not info.is_image else None


def _archive(folder: Path | None, suffix: str) -> Path | None:
    """Where the zip of a folder goes: beside it, as <folder><suffix>.zip."""
    return folder.parent / f"{folder.name}{suffix}.zip" if folder is not None and folder.is_dir() else None


def _download_target(path: Path | None, archive_suffix: str = ADAPTER_ZIP) -> Path | None:
    """A file (the image LoRA) as it is; a folder (an LLM adapter, a merged model) as a zip of it, made once beside
    the folder and again when the folder is newer. The zip is written under a hidden name first, so a half-written
    one is never listed or served."""
    if path is None:
        return None
    if path.is_file():
        return path
    archive = _archive(path, archive_suffix)
    if not archive.is_file() or archive.stat().st_mtime < path.stat().st_mtime:
        made = shutil.make_archive(str(archive.with_name(f".{archive.stem}.partial")), "zip", root_dir=path)
        Path(made).replace(archive)
    return archive


# --- the run's files as download links -------------------------------------------------------------------------------

LISTING_CSS = """
table { width: 100%; border-collapse: collapse; font-size: var(--text-md); }
td { padding: 4px 8px; border-bottom: 1px solid var(--border-color-primary); }
td.size { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.what { color: var(--body-text-color-subdued); }
.scroll { max-height: 320px; overflow-y: auto; }
"""


def _file_links(info: RunInfo, paths: list[str]) -> str:
    """The files as a table of download links, served from the workspace by gradio's file route (allowed_paths):
    nothing in it removes or hides a file."""
    if not paths:
        return ""
    roles = {**{a.path: f"the adapter saved at {a.label}" for a in info.adapters if a.step is not None},
             info.adapter: "the adapter", _archive(info.adapter, ADAPTER_ZIP): "the adapter folder, zipped",
             _archive(_merged_folder(info), ""): "the merged model (a full model without peft), zipped",
             info.folder / "config.yaml": "the run's settings: train.py --config reproduces it",
             info.folder / "events.jsonl": "the training log, one event a line"}
    rows = []
    for path in map(Path, paths):
        role = roles.get(path) or ("sample" if path.parent.name == "samples" else
                                   "in the adapter folder" if path.parent == info.adapter else "")
        name = html.escape(path.relative_to(info.folder).as_posix())
        link = f"gradio_api/file={html.escape(quote(str(path)))}"  # relative: works under a root path too
        rows.append(f"<tr><td><a href='{link}' download='{html.escape(path.name)}'>{name}</a></td>"
                    f"<td class='size'>{_size(path)}</td><td class='what'>{html.escape(role)}</td></tr>")
    return (f"<p><strong>Run files</strong> — click a name to download it</p>"
            f"<div class='scroll'><table>{''.join(rows)}</table></div>")


def _size(path: Path) -> str:
    try:
        size = float(path.stat().st_size)
    except OSError:  # removed since it was listed
        return ""
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
