"""Config tab: preset + detected hardware → the run's YAML (the very file `python train.py --config` reads), with the
reason for each chosen value, a peak-memory estimate, validation, and save/load in workspace/configs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from studio.config import FIELDS, TEXT_TASK, field_help, load_preset, parse_yaml, preset_names
from studio.errors import StudioError
from studio.plan.report import gb_text
from studio.plan.speed import estimate_text, run_signature
from studio.suggest import suggest_config, suggestion_yaml
from studio.ui.common import choices_update, help_table, ok, reports_errors
from studio.ui.context import Studio
from studio.workspace import check_name

REASON_COLUMNS = ["key", "value", "why", "what it is"]
BAR_CELLS = 30
PRESET_LABELS = {"style": "Style (SD1.5/SDXL)", "character": "Character (SD1.5/SDXL)", "llm-chat": "LLM chat",
                 "demo-image": "Demo: tiny SD, shapes", "demo-llm": "Demo: tiny Llama, Q&A"}


@dataclass
class ConfigTab:
    dataset: gr.Dropdown
    yaml: gr.Code  # the run config the Train tab starts
    hardware: gr.Markdown
    preset: gr.Dropdown
    base_model: gr.Dropdown
    run_name: gr.Textbox

    def on_page_load(self, app: gr.Blocks, studio: Studio) -> None:
        """Detect the hardware (imports torch: after the page is up) and fill the preset's defaults."""
        app.load(partial(page_load, studio), [self.preset, self.dataset],
                 [self.hardware, self.dataset, self.base_model, self.run_name], api_visibility="private")


def config_tab(studio: Studio) -> ConfigTab:
    presets = [(PRESET_LABELS.get(name, name), name) for name in preset_names()]
    first = "demo-image" if studio.demo and "demo-image" in preset_names() else presets[0][1]
    with gr.Tab("Config", id="config"):
        hardware = gr.Markdown("Detecting hardware...", elem_id="hardware")
        with gr.Row():
            preset = gr.Dropdown(presets, value=first, label="Preset", info=field_help("preset"),
                                 elem_id="preset-picker")
            dataset = gr.Dropdown(studio.dataset_choices(), label="Dataset", info=field_help("train_data_dir"),
                                  allow_custom_value=True)
            base_model = gr.Dropdown([], label="Base model (pick, or type a path / hub id)", allow_custom_value=True,
                                     info=field_help("base_model"))
            run_name = gr.Textbox(label="Run name", info="Outputs go to workspace/runs/<run name>.", elem_id="run-name")
        fill = gr.Button("Fill from preset + hardware", variant="primary", elem_id="fill-config")
        status = gr.Markdown(elem_id="config-status")
        with gr.Row():
            with gr.Column(scale=3):
                yaml_box = gr.Code(language="yaml", label="Run config (YAML: edit freely, validated on save)",
                                   lines=18, max_lines=40, interactive=True, elem_id="config-yaml")
                with gr.Row():
                    validate = gr.Button("✔ Validate")
                    name = gr.Textbox(label="Config name", placeholder="my_style", scale=2)
                    save = gr.Button("Save to workspace/configs")
                with gr.Row():
                    saved = gr.Dropdown(_saved_configs(studio), label="Saved configs", scale=2, allow_custom_value=True)
                    load = gr.Button("Load")
            with gr.Column(scale=2):
                memory = gr.Markdown(elem_id="memory-estimate")
                reasons = gr.Dataframe(headers=REASON_COLUMNS, label="What the fit chose, and why",
                                       interactive=False, wrap=True, column_widths=["22%", "14%", "34%", "30%"],
                                       elem_id="config-reasons")
        with gr.Accordion("All config keys", open=False):
            gr.Markdown(help_table(list(FIELDS)))

    preset.change(partial(preset_defaults, studio), [preset, dataset], [dataset, base_model, run_name],
                  api_visibility="private")
    fill.click(partial(fill_config, studio), [preset, dataset, base_model, run_name],
               [status, yaml_box, reasons, memory], api_name="fill_config")
    validate.click(partial(validate_config, studio), yaml_box, [status, memory], api_name="validate_config")
    save.click(partial(save_config, studio), [name, yaml_box], [status, saved], api_name="save_config")
    load.click(partial(load_config, studio), saved, [status, yaml_box, name], api_name="load_config")
    return ConfigTab(dataset, yaml_box, hardware, preset, base_model, run_name)


# --- handlers --------------------------------------------------------------------------------------------------------

def page_load(studio: Studio, preset: str, dataset: str | None):
    return (f"**Hardware:** {studio.hardware.summary()}", *preset_defaults(studio, preset, dataset))


def preset_defaults(studio: Studio, preset: str, dataset: str | None):
    """Base models for the preset's task, the demo's model and dataset for demo presets, and a fresh run name."""
    text = load_preset(preset).get("task_type") == TEXT_TASK
    models = studio.model_choices(image=not text)
    if preset.startswith("demo") and studio.demo:
        dataset = str((studio.demo.chat if text else studio.demo.images).relative_to(studio.workspace.root))
    return (choices_update(studio.dataset_choices(), keep=dataset),
            gr.update(choices=models, value=models[0][1] if models else None),
            _fresh_run_name(studio, preset))


@reports_errors(outputs=4)
def fill_config(studio: Studio, preset: str, dataset: str, base_model: str, run_name: str):
    if not preset:
        raise StudioError("Pick a preset first.")
    data_dir = studio.dataset_path(dataset)
    out_dir = studio.workspace.run_dir(check_name(run_name or _fresh_run_name(studio, preset), "run name"))
    hw = studio.hardware
    values, reasons, fitted = suggest_config(preset, hw, base_model=base_model or "", train_data_dir=str(data_dir),
                                           output_dir=str(out_dir))
    text = suggestion_yaml(values, reasons, header=f"{preset} preset on {hw.summary()}\n"
                                                   "Keys below override the preset; add any key from the list.")
    rows = [[key, _show(values.get(key)), why, field_help(key)] for key, why in reasons.items()]
    return (ok(f"Filled from the {preset} preset for {hw.name}. Review the YAML, then start it in the Train tab."),
            text, pd.DataFrame(rows, columns=REASON_COLUMNS), plan_markdown(studio, fitted))


@reports_errors(outputs=2)
def validate_config(studio: Studio, text: str):
    fitted = parse_config(studio, text)
    cfg = fitted.cfg
    return ok(f"Valid: {cfg.task_type} run '{cfg.name}' → {cfg.output_dir}"), plan_markdown(studio, fitted)


@reports_errors(outputs=2)
def save_config(studio: Studio, name: str, text: str):
    parse_config(studio, text)  # only valid configs are saved
    path = studio.workspace.config_path(name)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return (ok(f"Saved {path.relative_to(studio.workspace.root)}. Run it here or with "
               f"`python train.py --config {path}`."), choices_update(_saved_configs(studio), value=path.stem))


@reports_errors(outputs=3)
def load_config(studio: Studio, name: str):
    if not name:
        raise StudioError("Pick a saved config first.")
    path = studio.workspace.config_path(name)
    if not path.is_file():
        raise StudioError(f"There is no saved config called '{name}'.")
    return ok(f"Loaded {path.relative_to(studio.workspace.root)}."), path.read_text(encoding="utf-8"), path.stem


# --- shared with the Train tab ----------------------------------------------------------------------------------------

def parse_config(studio: Studio, text: str):
    """The YAML validated and fitted to the card (studio.plan.fit.Fitted, as `train.py` does it), its data and outputs
    in the workspace; a ConfigError says why not."""
    from studio.plan.fit import fit_config
    if not (text or "").strip():
        raise StudioError("The config is empty. Pick a preset and press 'Fill from preset + hardware'.")
    fitted = fit_config(parse_yaml(text, "The config"), studio.hardware, base_dir=studio.workspace.root)
    studio.check_confined(fitted.cfg)
    return fitted


def plan_markdown(studio: Studio, fitted) -> str:
    """The memory plan as the tab shows it: a bar (planned / card), the verdict, the table of components, and the
    run's time at the speed an earlier run of this size reached on this card."""
    plan = fitted.plan
    signature = run_signature(fitted.cfg, fitted.family, studio.hardware.name)
    icon = {"fits": "✔", "tight": "⚠", "too big": "✖", "cpu": "ℹ"}[plan.verdict]
    lines = [f"**Memory plan:** {icon} {plan.summary()}"]
    if plan.card_gb:
        filled = min(BAR_CELLS, round(BAR_CELLS * plan.peak_gb / plan.card_gb))
        lines.append(f"`{'█' * filled}{'░' * (BAR_CELLS - filled)}` {plan.peak_gb:.1f} / {plan.card_gb:g} GB")
    lines += ["", "| component | memory | detail |", "|---|---|---|"]
    lines += [f"| {row.name} | {gb_text(row.gb)} | {row.note} |" for row in plan.rows]
    lines += ["", f"_Model sizes: {plan.source}._", "", estimate_text(fitted.cfg, studio.workspace.runs, signature)]
    return "\n".join(lines)


def _saved_configs(studio: Studio) -> list[str]:
    folder = studio.workspace.configs
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _fresh_run_name(studio: Studio, preset: str) -> str:
    taken = set(studio.workspace.list_dirs(studio.workspace.runs))
    return next(f"{preset}-{i}" for i in range(1, 10_000) if f"{preset}-{i}" not in taken)


def _show(value) -> str:
    return "" if value is None else str(value)
