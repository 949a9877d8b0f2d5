"""Dataset tab, health check: the report of studio.data.health for the picked dataset and a saved config, with the
near-duplicates side by side and the blurry and low-resolution images as thumbnails."""

from __future__ import annotations

import shutil
from functools import partial

import gradio as gr

from studio.errors import StudioError
from studio.safe_names import cache_key
from studio.ui.common import choices_update, reports_errors
from studio.ui.context import Studio

DEFAULT_SETTINGS = ("the default settings", "")
GALLERY_PAIRS = 50
GALLERY_IMAGES = 100


def health_section(studio: Studio, dataset: gr.Dropdown) -> None:
    with gr.Accordion("Health check (before training)", open=False, elem_id="dataset-health") as section:
        gr.Markdown("Beyond what training refuses: near-duplicate, blurry and low-resolution images, caption "
                    "coverage, tag frequencies, the buckets and how much they crop, and the steps and time for a "
                    "saved config. Only the problems training refuses block it; the rest are warnings.")
        with gr.Row(equal_height=True):
            config = gr.Dropdown(_config_choices(studio), value="", label="Check for the config", scale=3,
                                 allow_custom_value=True, elem_id="health-config")  # saved since the page opened
            refresh = gr.Button("↻", size="sm", scale=0, elem_classes="refresh")
            check = gr.Button("Check the dataset", variant="primary", scale=0, min_width=200, elem_id="health-check")
        report = gr.Markdown(elem_id="health-report")
        duplicates = gr.Gallery(label="Near-duplicates, side by side", columns=2, height=360, object_fit="contain",
                                visible=False, elem_id="health-duplicates")
        flagged = gr.Gallery(label="Blurry or low-resolution", columns=4, height=300, object_fit="contain",
                             visible=False, elem_id="health-flagged")
    for event in (refresh.click, section.expand):  # opened: the configs saved since the page loaded are offered
        event(lambda current: choices_update(_config_choices(studio), keep=current), config, config,
              api_visibility="private")
    check.click(partial(check_health, studio), [dataset, config], [report, duplicates, flagged],
                api_name="check_dataset")
    # A report is of the dataset it checked: another dataset picked, it goes.
    dataset.change(lambda: ("", gr.update(visible=False), gr.update(visible=False)), None,
                   [report, duplicates, flagged], api_visibility="private", show_progress="hidden")


def _config_choices(studio: Studio) -> list[tuple[str, str]]:
    folder = studio.workspace.configs
    saved = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return [DEFAULT_SETTINGS] + [(name, name) for name in saved]


@reports_errors(outputs=3)
def check_health(studio: Studio, value: str, config: str | None, progress=gr.Progress()):
    from studio.data.health import check_dataset  # loads torch: only when a check runs
    from studio.data.health_text import report_markdown

    folder = studio.dataset_path(value)
    thumbnails = studio.workspace.root / ".cache" / "health" / cache_key(folder)  # never a path from the input
    shutil.rmtree(thumbnails, ignore_errors=True)  # no thumbnails of images deleted since the last check

    def report_progress(done: int, total: int) -> None:
        progress((done, total), desc="Checking images", unit="images")

    report = check_dataset(folder, **_run_settings(studio, folder, config), thumbnails=thumbnails,
                           progress=report_progress)
    pairs = [(facts.thumbnail, f"{facts.name}" + (f" · {d.bits} bits" if facts is d.second else ""))
             for d in report.duplicates[:GALLERY_PAIRS] for facts in (d.first, d.second)]
    flagged = [(f.thumbnail, f"{f.name}: blurry ({f.sharpness:.0f})") for f in report.blurry]
    flagged += [(f.thumbnail, f"{f.name}: {f.size[0]}x{f.size[1]}, ×{f.upscale:.1f}") for f in report.low_res]
    return (report_markdown(report), gr.update(value=pairs, visible=bool(pairs)),
            gr.update(value=flagged[:GALLERY_IMAGES], visible=bool(flagged)))


def _run_settings(studio: Studio, folder, config: str | None) -> dict:
    """The saved config fitted to this machine as a run from the Train tab would be, on the picked dataset."""
    if not config:
        return {}
    from studio.config import parse_yaml
    from studio.plan.fit import fit_config
    path = studio.workspace.config_path(config)
    if not path.is_file():
        raise StudioError(f"There is no saved config called '{config}'. Press ↻ and pick one from the list.")
    data = {**parse_yaml(path.read_text(encoding="utf-8"), str(path)), "train_data_dir": str(folder),
            "metadata_path": None}  # the picked dataset's own captions
    fitted = fit_config(data, studio.hardware, base_dir=studio.workspace.root)
    return {"cfg": fitted.cfg, "family": fitted.family, "runs_dir": studio.workspace.runs,
            "device": studio.hardware.name}
