"""Config tab: preset + detected hardware → the run's YAML (the very file `python train.py --config` reads), with the
reason for each chosen value, a peak-memory estimate, validation, and save/load in workspace/configs. A form holds the
keys most runs touch; it and the YAML stay in sync both ways, and the YAML stays the source of truth."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.config import FIELDS, field_help, parse_yaml, preset_names
from studio.errors import StudioError
from studio.fileio import write_text_atomic
from studio.plan.report import gb_text
from studio.plan.speed import estimate_text, run_signature
from studio.suggest import suggest_config, suggestion_yaml
from studio.ui.common import choices_update, error, help_table, note, ok, reports_errors
from studio.ui.config_form import (FORM_ROWS, GPU_KEY, form_edit, form_widget, set_config_key,
                                   set_yaml_key, yaml_to_form)
from studio.ui.context import Studio
from studio.ui.preset_picks import dataset_for, is_text_preset, models_for
from studio.ui.replace_guard import ReplaceGuard
from studio.workspace import check_name

REASON_COLUMNS = ["key", "value", "why", "what it is"]
BAR_CELLS = 30
PRESET_LABELS = {"style": "Style (SD1.5/SDXL)", "character": "Character (SD1.5/SDXL)", "llm-chat": "LLM chat",
                 "demo-image": "Demo: tiny SD, shapes", "demo-flux": "Demo: tiny random Flux.1",
                 "demo-llm": "Demo: tiny random Llama (replies are noise)"}


@dataclass
class ConfigTab:
    dataset: gr.Dropdown
    yaml: gr.Code  # the run config the Train tab starts
    hardware: gr.Markdown
    preset: gr.Dropdown
    base_model: gr.Dropdown
    run_name: gr.Textbox
    status: gr.Markdown  # under Fill: what Fill did, or why it did not
    gpus: gr.Number
    guard: ReplaceGuard  # the Train tab's Start and Add to queue check it too
    saved: gr.Dropdown

    def on_page_load(self, app: gr.Blocks, studio: Studio) -> None:
        """Detect the hardware (imports torch: after the page is up), fill the preset's defaults, and bring back the
        YAML the editor held (the draft kept in the workspace)."""
        pickers = [self.preset, self.dataset, self.base_model, self.run_name]
        app.load(partial(page_load, studio), [self.preset, self.dataset], pickers[1:] + [self.hardware],
                 api_visibility="private").then(partial(restore_draft, studio), None, [self.status, self.yaml,
                                                                                       *pickers],
                                                api_visibility="private")
        app.load(gpu_choice, None, self.gpus, api_visibility="private")
        app.load(lambda: gr.update(choices=_saved_configs(studio)), None, self.saved, api_visibility="private")


@dataclass
class _Files:
    """The controls under the editor: Validate, Save, Load, Copy command, and the line that answers them."""
    validate: gr.Button
    name: gr.Textbox
    save: gr.Button
    saved: gr.Dropdown
    load: gr.Button
    copy: gr.Button
    command: gr.Textbox
    status: gr.Markdown


def config_tab(studio: Studio) -> ConfigTab:
    presets = [(PRESET_LABELS.get(name, name), name) for name in preset_names()]
    first = "demo-image" if studio.demo and "demo-image" in preset_names() else presets[0][1]
    with gr.Tab("Config", id="config") as config:
        hardware = gr.Markdown("Detecting hardware...", elem_id="hardware")
        with gr.Row():
            preset = gr.Dropdown(presets, value=first, label="Preset", info=field_help("preset"),
                                 elem_id="preset-picker")
            dataset = gr.Dropdown(studio.dataset_choices(), label="Dataset", info=field_help("train_data_dir"),
                                  allow_custom_value=True, elem_id="config-dataset")
            base_model = gr.Dropdown([], label="Base model (pick, or type a path / hub id)", allow_custom_value=True,
                                     info=field_help("base_model"), elem_id="config-base-model")
            run_name = gr.Textbox(label="Run name", info="Outputs go to workspace/runs/<run name>.", elem_id="run-name")
        fill = gr.Button("Fill from preset + hardware", variant="primary", elem_id="fill-config")
        status = gr.Markdown(elem_id="config-status")
        with gr.Accordion("Common settings (each one is a line of the YAML below)", open=True):
            form = {}
            for row in FORM_ROWS:
                with gr.Row():
                    form.update({key: form_widget(key) for key in row})
        form_status = gr.Markdown(elem_id="config-form-status")
        with gr.Row():
            with gr.Column(scale=3):
                yaml_box = gr.Code(language="yaml", label="Run config (YAML: edit freely, validated on save)",
                                   lines=18, max_lines=40, interactive=True, elem_id="config-yaml")
                files = _file_controls(studio)
            with gr.Column(scale=2):
                memory = gr.Markdown(elem_id="memory-estimate")
                reasons = gr.Dataframe(headers=REASON_COLUMNS, label="What the fit chose, and why",
                                       interactive=False, wrap=True, column_widths=["22%", "14%", "34%", "30%"],
                                       elem_id="config-reasons")
        with gr.Accordion("All config keys", open=False):
            gr.Markdown(help_table(list(FIELDS)))
        gr.api(set_config_key, api_name="set_config_key")  # what a form edit does, for scripts: one key into the YAML
        guard = ReplaceGuard.create()  # inside the tab: a component directly in gr.Tabs shows up in its tab bar

    tab = ConfigTab(dataset, yaml_box, hardware, preset, base_model, run_name, status, form[GPU_KEY], guard,
                    files.saved)
    config.select(partial(fresh_lists, studio), [dataset, files.saved], [dataset, files.saved],
                  api_visibility="private", show_progress="hidden")
    # The user's pick only: a restored draft sets the preset to what it holds, and keeps its model and run name.
    preset.input(partial(preset_defaults, studio), [preset, dataset], [dataset, base_model, run_name],
                 api_visibility="private")
    guard.replacing(fill, yaml_box, status).success(
        partial(fill_config, studio), [preset, dataset, base_model, run_name], [status, yaml_box, reasons, memory],
        api_name="fill_config")
    # always_last: typing fires an event a key, and the name last typed must be the one the YAML ends with
    run_name.input(partial(rename_run, studio), [run_name, yaml_box], [status, yaml_box], api_visibility="private",
                   trigger_mode="always_last")
    yaml_box.change(partial(save_draft, studio), yaml_box, None, api_visibility="private", show_progress="hidden",
                    trigger_mode="always_last")
    _connect_files(studio, tab, files, memory)
    guard.track_edits(yaml_box)
    _connect_form(studio, tab, form, form_status, memory)
    return tab


def _connect_form(studio: Studio, tab: ConfigTab, form: dict, form_status: gr.Markdown, memory: gr.Markdown) -> None:
    """YAML → form on every change (typing, Fill, Load, a form edit); form → YAML only on the user's own edits
    (input / blur / submit), so the form's own updates never loop back; a form edit refreshes the memory plan."""
    yaml_box, edited = tab.yaml, tab.guard.edited
    yaml_box.change(yaml_to_form, yaml_box, [form_status, *form.values()], api_name="config_form",
                    show_progress="hidden")
    for key, widget in form.items():
        triggers = [widget.input] if isinstance(widget, (gr.Dropdown, gr.Checkbox)) else [widget.blur, widget.submit]
        gr.on(triggers, partial(form_edit, key), [widget, yaml_box], [form_status, yaml_box, edited],
              api_visibility="private", show_progress="hidden").then(
            partial(refresh_plan, studio), [yaml_box, edited], memory, api_visibility="private",
            show_progress="hidden")


def _file_controls(studio: Studio) -> _Files:
    with gr.Row():
        validate = gr.Button("✔ Validate", elem_id="validate-config")
        name = gr.Textbox(label="Config name", placeholder="my_style", scale=2, elem_id="config-name")
        save = gr.Button("Save to workspace/configs", elem_id="save-config")
    with gr.Row():
        saved = gr.Dropdown(_saved_configs(studio), label="Saved configs", scale=2, allow_custom_value=True,
                            elem_id="saved-configs")
        load = gr.Button("Load", elem_id="load-config")
    status = gr.Markdown(elem_id="config-file-status")  # by the buttons that it answers
    with gr.Row():
        copy = gr.Button("Copy command", elem_id="copy-command")
        command = gr.Textbox(label="Train the saved config from a terminal", buttons=["copy"],
                             interactive=False, scale=3, elem_id="config-command")
    return _Files(validate, name, save, saved, load, copy, command, status)


def _connect_files(studio: Studio, tab: ConfigTab, files: _Files, memory: gr.Markdown) -> None:
    yaml_box, guard = tab.yaml, tab.guard
    files.validate.click(partial(validate_config, studio), yaml_box, [files.status, memory],
                         api_name="validate_config")
    files.save.click(partial(save_config, studio), [files.name, yaml_box], [files.status, files.saved],
                     api_name="save_config").then(
        partial(saved_edits, studio), [files.name, yaml_box, guard.edited, guard.pending],
        [guard.edited, guard.pending], api_visibility="private", show_progress="hidden")
    guard.replacing(files.load, yaml_box, files.status).success(
        partial(load_config, studio), files.saved, [files.status, yaml_box, files.name], api_name="load_config")
    files.copy.click(partial(copy_command, studio), [files.saved, yaml_box], [files.status, files.command],
                     api_name="copy_command")


# --- handlers --------------------------------------------------------------------------------------------------------

def gpu_choice(count: int | None = None):
    """The GPUs (num_processes) widget: shown, up to `count`, when more than one CUDA GPU is present (count: the
    number of GPUs; None detects it, which imports torch)."""
    if count is None:
        from studio.distributed import gpu_count
        count = gpu_count()
    return gr.update(visible=count > 1, maximum=max(count, 1))


def page_load(studio: Studio, preset: str, dataset: str | None):
    return (*preset_defaults(studio, preset, dataset), f"**Hardware:** {studio.hardware.summary()}")


def preset_defaults(studio: Studio, preset: str, dataset: str | None):
    """Base models for the preset's task (its family's first: studio.ui.preset_picks), a dataset of the kind it
    trains on (the demo's for demo presets), and a fresh run name."""
    models = models_for(studio, preset)
    if preset.startswith("demo") and studio.demo:
        demo = studio.demo.chat if is_text_preset(preset) else studio.demo.images
        dataset = str(demo.relative_to(studio.workspace.root))
    return (choices_update(studio.dataset_choices(), keep=dataset_for(studio, preset, dataset)),
            gr.update(choices=models, value=models[0][1] if models else None),
            _fresh_run_name(studio, preset))


def fresh_lists(studio: Studio, dataset: str | None, saved: str | None):
    """The datasets and saved configs as the workspace holds them now (made elsewhere since the page loaded)."""
    return (gr.update(choices=studio.dataset_choices(), value=dataset),
            gr.update(choices=_saved_configs(studio), value=saved))


def saved_edits(studio: Studio, name: str, text: str, edited: str | None, pending: str | None):
    """(edited, pending) after Save: edits now in a saved config are no longer unsaved, and may be trained."""
    try:
        path = studio.workspace.config_path(name)
    except StudioError:
        return edited, pending
    if path.is_file() and path.read_text(encoding="utf-8").strip() == (text or "").strip():
        return None, None
    return edited, pending


def draft_path(studio: Studio) -> Path:
    return studio.workspace.root / ".drafts" / "config.yaml"


def save_draft(studio: Studio, text: str) -> None:
    """The editor's YAML, kept across page reloads and restarts (an emptied editor keeps the last draft)."""
    if (text or "").strip():
        write_text_atomic(draft_path(studio), text)


def restore_draft(studio: Studio):
    """The draft back in the editor, and the pickers above it showing what it holds (preset, dataset, base model,
    run name) rather than the defaults of the page."""
    path = draft_path(studio)
    if not path.is_file():
        return (gr.skip(),) * 6
    text = path.read_text("utf-8")
    try:
        data = parse_yaml(text)
    except StudioError:
        data = {}
    return (note("Restored the YAML you were editing (a draft kept in the workspace)."), text,
            *_pickers_of(studio, data))


def _pickers_of(studio: Studio, data: dict) -> tuple:
    """(preset, dataset, base model, run name) as a YAML gives them; a skip for what it does not say."""
    preset, base = str(data.get("preset") or ""), str(data.get("base_model") or "")
    out, dataset = Path(str(data.get("output_dir") or "")), str(data.get("train_data_dir") or "")
    try:
        dataset = str(Path(dataset).resolve().relative_to(studio.workspace.root)) if dataset else ""
    except ValueError:  # outside the workspace: not one of the picker's datasets
        dataset = ""
    return (preset if preset in preset_names() else gr.skip(), dataset or gr.skip(), base or gr.skip(),
            out.name if out.parent.name == "runs" else gr.skip())


@reports_errors(outputs=2)
def rename_run(studio: Studio, run_name: str, text: str):
    """A new run name moves the YAML's output_dir to workspace/runs/<run name>."""
    if not (text or "").strip():
        return gr.skip(), gr.skip()
    out_dir = studio.workspace.run_dir(check_name(run_name, "run name"))
    return note(f"Outputs go to {out_dir.relative_to(studio.workspace.root)}."), set_yaml_key(text, "output_dir",
                                                                                               str(out_dir))


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


def refresh_plan(studio: Studio, text: str, edited: str | None):
    """The memory plan again after a form edit changed the YAML (`edited` is it then); a YAML that does not
    validate keeps the last plan — Validate says what is wrong."""
    if not (text or "").strip() or text.strip() != (edited or "").strip():
        return gr.skip()
    try:
        return plan_markdown(studio, parse_config(studio, text))
    except StudioError:
        return gr.skip()


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


@reports_errors(outputs=2)
def copy_command(studio: Studio, name: str | None, text: str):
    """The command that trains the config saved by Save (the one picked under 'Saved configs')."""
    path = studio.workspace.config_path(name) if name else None
    if path is None or not path.is_file():
        missing = f"There is no saved config called '{name}'" if name else "Nothing is saved yet"
        return error(f"{missing}: give the config a name and press 'Save to workspace/configs' first, then copy "
                     "its command."), ""
    shown = path.relative_to(studio.workspace.root)
    if path.read_text(encoding="utf-8").strip() != (text or "").strip():
        message = note(f"The command trains {shown} as saved; the YAML in the editor differs from it. Save again "
                       "to train your edits.")
    else:
        message = ok(f"The command trains {shown}. Copy it with the button and run it in the studio's folder.")
    return message, f"python train.py --config {shlex.quote(str(path))}"


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
    lines += [f"| phase: {row.name}{' (peak)' if row.name == plan.peak_phase else ''} | {gb_text(row.gb)} | "
              f"{row.note} |" for row in plan.phases]  # image runs: what each phase holds on the card
    lines += ["", f"_Model sizes: {plan.source}._", "", estimate_text(fitted.cfg, studio.workspace.runs, signature)]
    return "\n".join(lines)


def _saved_configs(studio: Studio) -> list[str]:
    folder = studio.workspace.configs
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _fresh_run_name(studio: Studio, preset: str) -> str:
    return studio.index.unique_name(f"{preset}-1")


def _show(value) -> str:
    return "" if value is None else str(value)
