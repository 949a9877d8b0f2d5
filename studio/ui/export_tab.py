"""Export tab: a run's adapter header (family, rank, alpha, steps... as a table), its files as download links,
copying an image LoRA into a WebUI/ComfyUI LoRA folder, and merging an LLM adapter into its base model (the merged
folder is offered as a zip)."""

from __future__ import annotations

import datetime
import html
import json
import shutil
from functools import partial
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from studio.config import parse_yaml
from studio.errors import StudioError
from studio.events import FINAL_KINDS, read_events
from studio.export.install import folder_hint, install_lora, prompt_tag
from studio.ui.common import choices_update, error, note, ok, reports_errors
from studio.ui.context import RunInfo, Studio

FILE_LIMIT = 60
ADAPTER_ZIP = "-adapter"  # an LLM adapter folder <name>/ downloads as <name>-adapter.zip
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a peft adapter folder's files


def export_tab(studio: Studio) -> None:
    with gr.Tab("Export", id="export") as tab:
        with gr.Row(equal_height=True):
            run = gr.Dropdown(studio.run_choices(), label="Run", scale=3, allow_custom_value=True, elem_id="export-run")
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

    outputs = [status, files, download, install_group, merge_button]
    details = (partial(show_run_details, studio), run, [header, listing])
    run.change(partial(show_run, studio), run, outputs, api_name="export_run").then(*details, api_name="export_details")
    for trigger in (refresh.click, tab.select):  # the dropdown shows a run from the start: show it, up to date
        trigger(partial(refresh_runs, studio), run, run, api_visibility="private").then(
            partial(show_run, studio), run, outputs, api_visibility="private").then(*details, api_visibility="private")
    install_button.click(partial(install, studio), [run, lora_dir, overwrite], status, api_name="install_lora")
    merge_button.click(partial(merge_into_base, studio), run, outputs, api_name="merge_adapter").then(
        *details, api_visibility="private")
    check_button.click(partial(self_test, studio), [run, check_path], status, api_name="check_lora")


# --- handlers --------------------------------------------------------------------------------------------------------

def refresh_runs(studio: Studio, current: str | None):
    return choices_update(studio.run_choices(), keep=current)


@reports_errors(outputs=5)
def show_run(studio: Studio, name: str | None):
    """Summary, files and download of a run; the install controls for image LoRAs, merge for LLM adapters."""
    if not name:
        return "", [], *[gr.update(visible=False)] * 3
    info = studio.run(name)
    download = _download_target(info.adapter)
    if merged := _merged_folder(info):
        _download_target(merged, archive_suffix="")  # <run>-merged.zip, listed with the run's files
    finished = info.adapter is not None
    return (_run_summary(studio, info), _run_files(info),
            gr.update(value=str(download), visible=True) if download else gr.update(visible=False),
            gr.update(visible=finished and info.is_image), gr.update(visible=finished and not info.is_image))


def show_run_details(studio: Studio, name: str | None) -> tuple[str, str]:
    """The adapter's header as a table and the run's files as download links (after show_run made the zips)."""
    try:
        info = studio.run(name) if name else None
    except StudioError:
        info = None  # show_run has already said why
    if info is None:
        return "", ""
    return _header_table(info), _file_links(info, _run_files(info))


@reports_errors(outputs=1)
def install(studio: Studio, name: str, lora_dir: str, overwrite: bool):
    info = studio.run(name)
    if not info.is_image or info.adapter is None:
        raise StudioError(f"'{name}' has no image LoRA to install ({info.status}). Pick a finished image run.")
    target = install_lora(info.adapter, lora_dir, overwrite=bool(overwrite))
    hint = folder_hint(lora_dir)
    copied = ok(f"Copied to {target}. In a prompt: `{prompt_tag(target)}`" + (f"\n\n{note(hint)}" if hint else ""))
    return f"{copied}\n\n{_run_summary(studio, info)}"  # the run's summary stays on the page


@reports_errors(outputs=1)
def self_test(studio: Studio, name: str, path: str):
    """The export self-test of the run's adapter, or of any LoRA file, against the run's base model."""
    from studio.export.selftest import check_against_base  # loads diffusers on first use

    info = studio.run(name)
    if not info.is_image:
        raise StudioError(f"'{name}' is an LLM run; the self-test checks image LoRAs. Pick an image run.")
    target = Path(path.strip()) if path and path.strip() else info.adapter
    if target is None:
        raise StudioError(f"'{name}' has no adapter yet ({info.status}); give the path of a LoRA file to check.")
    test = check_against_base(target, info.base_model)
    text = f"{target.name}: {test.summary()}"
    return ok(text) if test.ok else error(text)


@reports_errors(outputs=5)
def merge_into_base(studio: Studio, name: str):
    from studio.export.peft_merge import merge_adapter  # loads transformers/peft on first use

    info = studio.run(name)
    if info.is_image or info.adapter is None or not info.adapter.is_dir():
        raise StudioError(f"'{name}' is not a finished LLM run; merging applies to LLM adapters. Image LoRAs "
                          "are used as they are (see 'Copy into the LoRA folder').")
    target = info.folder / f"{info.name}-merged"
    merge_adapter(info.adapter, target, base_model=info.base_model or None)
    summary, *rest = show_run(studio, name)
    return (ok(f"Merged into {target.relative_to(studio.workspace.root)}: a full model that loads with "
               "`AutoModelForCausalLM.from_pretrained` without peft.") + "\n\n" + summary, *rest)


# --- views -----------------------------------------------------------------------------------------------------------

def _run_summary(studio: Studio, info: RunInfo) -> str:
    kind = "image LoRA" if info.is_image else "LLM adapter"
    lines = [f"**{info.name}** — {kind}, {info.status}; base model `{info.base_model}`"]
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


def _merged_folder(info: RunInfo) -> Path | None:
    """The LLM run's merged model, if there is one: <run>-merged/ from the Merge button, <adapter>-merged/ from
    save_merged_model (the same folder unless the run set an output_name)."""
    names = {info.name} | ({info.adapter.name} if info.adapter is not None else set())
    folders = [info.folder / f"{name}-merged" for name in sorted(names)]
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


# --- the adapter's header as a table ---------------------------------------------------------------------------------

NETWORK_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def _header_table(info: RunInfo) -> str:
    """The facts the adapter records about its training, as a two-column Markdown table ('' while there is none)."""
    if info.adapter is None:
        return ""
    weights = info.adapter / PEFT_WEIGHTS if info.adapter.is_dir() else info.adapter
    header = _safetensors_metadata(weights)
    events = read_events(info.folder / "events.jsonl")
    rows = _image_rows(info, header) if info.is_image else _llm_rows(info, header)
    rows += _training_rows(info, header, events)
    if info.is_image and header.get("studio_selftest"):
        tests = [e for e in events if e.kind == "selftest"]
        passed = tests[-1].data.get("ok") if tests else header["studio_selftest"].startswith("all ")
        rows.append(("Self-test", f"{'✔' if passed else '✖'} {header['studio_selftest']}"))
    base = header.get("ss_sd_model_name") if info.is_image else _adapter_config(info).get("base_model_name_or_path")
    rows.append(("Base model", f"`{base or info.base_model}`"))
    if not header:
        rows.append(("Header", note(f"{weights.name} records no training facts (or could not be read).")))
    title = f"`{info.adapter.name}{'/' if info.adapter.is_dir() else ''}`"
    lines = [f"| Adapter | {title} |", "|---|---|"] + [f"| {key} | {_cell(value)} |" for key, value in rows if value]
    return "\n".join(lines)


def _image_rows(info: RunInfo, header: dict[str, str]) -> list[tuple[str, str]]:
    from studio.families import get_family  # the registry: no torch

    family = header.get("studio_model_family", "")
    try:
        family = f"{get_family(family).label} (`{family}`)" if family else header.get("ss_base_model_version", "")
    except StudioError:
        pass  # a family this version does not know: its name as written
    args = _json(header.get("ss_network_args"))
    algo = args.get("algo") if header.get("ss_network_module") == "lycoris.kohya" else "lora"
    network = "dora" if algo == "lora" and args.get("dora_wd") == "True" else algo or "lora"
    network = NETWORK_LABELS.get(network, network)  # conv layers' own rank and alpha: in the Rank and Alpha rows
    if args.get("factor"):
        network += f" (factor {args['factor']})"
    if _config(info).get("use_rslora"):
        network += ", rank-stabilised (rsLoRA)"
    side = header.get("modelspec.resolution", "")
    return [("Family", family), ("Network", network),
            ("Rank", _number(header.get("ss_network_dim")) + _conv(args, "conv_dim")),
            ("Alpha", _number(header.get("ss_network_alpha")) + _conv(args, "conv_alpha")),
            ("Resolution", side.replace("x", " × "))]


def _llm_rows(info: RunInfo, header: dict[str, str]) -> list[tuple[str, str]]:
    from studio.families import get_family

    config = _adapter_config(info)
    model_type = header.get("studio_model_type")
    network = "DoRA" if config.get("use_dora") else "LoRA"
    if config.get("use_rslora"):
        network += ", rank-stabilised (rsLoRA)"
    if header.get("studio_load_in_4bit") == "true":
        network += " on a 4-bit base (QLoRA)"
    targets = config.get("target_modules") or header.get("studio_target_modules", "")
    if not isinstance(targets, str):  # a list, maybe of full module paths: their names, and how many layers
        names = sorted({t.rsplit(".", 1)[-1] for t in targets})
        targets = ", ".join(names) + (f" ({len(targets)} modules)" if len(names) < len(targets) else "")
    return [("Family", get_family("llm").label + (f" (`{model_type}`)" if model_type else "")), ("Network", network),
            ("Rank", _number(config.get("r", header.get("ss_network_dim")))),
            ("Alpha", _number(config.get("lora_alpha", header.get("ss_network_alpha")))),
            ("Target modules", targets)]


def _training_rows(info: RunInfo, header: dict[str, str], events: list) -> list[tuple[str, str]]:
    """Steps, dataset size, training time and learning rate: from the header, else from the run's events."""
    finals = [e for e in events if e.kind in FINAL_KINDS]
    final = finals[-1] if finals else None
    steps = _number(header.get("ss_steps")) or (str(final.step) if final else "")
    if steps.isdigit() and final and final.total and int(steps) < final.total:
        steps += f" of {final.total}" + (" (stopped early)" if final.kind == "stopped" else "")
    count = header.get("ss_num_train_images")
    dataset = ""
    if count:
        unit = "image" if info.is_image else "sample"
        dataset = f"{count} {unit}{'' if count == '1' else 's'}"
        folders = _json(header.get("ss_dataset_dirs"))
        folder = next(iter(folders), None) or Path(str(_config(info).get("train_data_dir") or "")).name
        repeats = (folders.get(folder) or {}).get("n_repeats") if folder in folders else None
        if folder:
            dataset += f" in `{folder}`" + (f", {repeats} repeats" if repeats and repeats != 1 else "")
    seconds = _float(header.get("ss_training_time_s"))
    starts = [e for e in events if e.kind == "start"]
    if seconds is None and final and starts:
        seconds = final.time - starts[-1].time
    finished = _float(header.get("ss_training_finished_at")) or (final.time if final else None)
    return [("Steps", steps), ("Dataset", dataset),
            ("Training time", _duration(seconds) if seconds is not None else ""),
            ("Learning rate", header.get("ss_learning_rate") or str(_config(info).get("learning_rate") or "")),
            ("Finished", datetime.datetime.fromtimestamp(finished).strftime("%Y-%m-%d %H:%M") if finished else "")]


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open  # the numpy framework: no torch

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError):
        return {}


def _adapter_config(info: RunInfo) -> dict:
    return _json_file(info.adapter / PEFT_CONFIG) if info.adapter is not None and info.adapter.is_dir() else {}


def _config(info: RunInfo) -> dict:
    try:
        return parse_yaml((info.folder / "config.yaml").read_text(encoding="utf-8"), "config.yaml") or {}
    except (OSError, StudioError):
        return {}


def _json_file(path: Path) -> dict:
    try:
        return _json(path.read_text(encoding="utf-8"))
    except OSError:
        return {}


def _json(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _number(value) -> str:
    """'4.0' → '4', '0.5' → '0.5'; anything else as it is."""
    number = _float(value)
    if number is None:
        return "" if value is None else str(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


def _conv(args: dict, key: str) -> str:
    return f" (conv layers: {_number(args[key])})" if key in args else ""


def _duration(seconds: float) -> str:
    """12.3 → '12 s', 125 → '2 min 5 s', 3725 → '1 h 2 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _cell(value: str) -> str:
    """A value that keeps a Markdown table row whole."""
    return str(value).replace("|", "\\|").replace("\n", " ")


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
    roles = {info.adapter: "the adapter", _archive(info.adapter, ADAPTER_ZIP): "the adapter folder, zipped",
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
