"""Export tab: a run's files with download buttons, copying an image LoRA into a WebUI/ComfyUI LoRA folder, and
merging an LLM adapter into its base model."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import gradio as gr

from studio.errors import StudioError
from studio.export.install import folder_hint, install_lora, prompt_tag
from studio.ui.common import choices_update, error, note, ok, reports_errors
from studio.ui.context import RunInfo, Studio

FILE_LIMIT = 60


def export_tab(studio: Studio) -> None:
    with gr.Tab("Export", id="export") as tab:
        with gr.Row(equal_height=True):
            run = gr.Dropdown(studio.run_choices(), label="Run", scale=3, allow_custom_value=True, elem_id="export-run")
            refresh = gr.Button("↻ Refresh", size="sm", scale=0)
        status = gr.Markdown(elem_id="export-status")
        with gr.Row():
            files = gr.File(label="Run files (click to download)", file_count="multiple", interactive=False,
                            height=260, scale=3, elem_id="export-files")
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

    outputs = [status, files, download, install_group, merge_button]
    run.change(partial(show_run, studio), run, outputs, api_name="export_run")
    refresh.click(partial(refresh_runs, studio), run, run, api_visibility="private")
    tab.select(partial(refresh_runs, studio), run, run, api_visibility="private")
    install_button.click(partial(install, studio), [run, lora_dir, overwrite], status, api_name="install_lora")
    merge_button.click(partial(merge_into_base, studio), run, outputs, api_name="merge_adapter")
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
    download = _download_target(info)
    finished = info.adapter is not None
    return (_run_summary(studio, info), _run_files(info),
            gr.update(value=str(download), visible=True) if download else gr.update(visible=False),
            gr.update(visible=finished and info.is_image), gr.update(visible=finished and not info.is_image))


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
    """The files worth downloading: top-level files, the adapter folder's files, and the samples."""
    files = [p for p in sorted(info.folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if info.adapter is not None and info.adapter.is_dir():
        files += sorted(p for p in info.adapter.iterdir() if p.is_file())
    samples = info.folder / "samples"
    if samples.is_dir():
        files += sorted(p for p in samples.iterdir() if p.is_file())
    return [str(p) for p in files[:FILE_LIMIT]]


def _download_target(info: RunInfo) -> Path | None:
    """The adapter file, or for an LLM adapter folder a zip of it (made once, beside the folder)."""
    if info.adapter is None:
        return None
    if info.adapter.is_file():
        return info.adapter
    archive = info.folder / f"{info.adapter.name}-adapter.zip"
    if not archive.is_file() or archive.stat().st_mtime < info.adapter.stat().st_mtime:
        made = shutil.make_archive(str(archive.with_suffix("")), "zip", root_dir=info.adapter)
        Path(made).replace(archive)
    return archive
