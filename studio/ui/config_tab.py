"""Config tab: preset + detected hardware → the run's YAML (the very file `python train.py --config` reads), with the
reason for each chosen value, a peak-memory estimate, validation, and save/load in workspace/configs. A form holds the
keys most runs touch; it and the YAML stay in sync both ways, and the YAML stays the source of truth."""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd
import yaml

from studio.config import (FIELDS, TEXT_TASK, coerce_value, field_help, field_type, load_preset, parse_yaml,
                           preset_names)
from studio.errors import StudioError
from studio.fileio import write_text_atomic
from studio.plan.report import gb_text
from studio.plan.speed import estimate_text, run_signature
from studio.suggest import suggest_config, suggestion_yaml
from studio.ui.common import choices_update, error, help_table, note, ok, reports_errors
from studio.ui.context import Studio
from studio.workspace import check_name

REASON_COLUMNS = ["key", "value", "why", "what it is"]
BAR_CELLS = 30
PRESET_LABELS = {"style": "Style (SD1.5/SDXL)", "character": "Character (SD1.5/SDXL)", "llm-chat": "LLM chat",
                 "demo-image": "Demo: tiny SD, shapes", "demo-llm": "Demo: tiny random Llama (replies are noise)"}
# The form: the keys most runs touch, a row each line. Every widget is made from the key's schema entry.
FORM_ROWS = [["base_model", "train_data_dir", "trigger_word", "resolution"],
             ["network_type", "lora_rank", "lora_alpha", "learning_rate"],
             ["batch_size", "gradient_accumulation_steps", "max_train_steps", "epochs"],
             ["mixed_precision", "gradient_checkpointing", "save_steps", "sample_prompts", "num_processes"]]
FORM_KEYS = [key for row in FORM_ROWS for key in row]
GPU_KEY = "num_processes"  # shown as "GPUs", and only where more than one CUDA GPU is present (gpu_choice)
FORM_STEPS = {"learning_rate": 1e-5}  # the spinner's step where 1 makes no sense
_KEY_LINE = re.compile(r"(?P<key>[A-Za-z_][\w-]*)\s*:(\s|$)")  # a top-level `key:` line


@dataclass
class ConfigTab:
    dataset: gr.Dropdown
    yaml: gr.Code  # the run config the Train tab starts
    hardware: gr.Markdown
    preset: gr.Dropdown
    base_model: gr.Dropdown
    run_name: gr.Textbox

    status: gr.Markdown
    gpus: gr.Number

    def on_page_load(self, app: gr.Blocks, studio: Studio) -> None:
        """Detect the hardware (imports torch: after the page is up), fill the preset's defaults, and bring back the
        YAML the editor held (the draft kept in the workspace)."""
        app.load(partial(page_load, studio), [self.preset, self.dataset],
                 [self.hardware, self.dataset, self.base_model, self.run_name], api_visibility="private")
        app.load(partial(restore_draft, studio), None, [self.status, self.yaml], api_visibility="private")
        app.load(gpu_choice, None, self.gpus, api_visibility="private")


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
                with gr.Row():
                    validate = gr.Button("✔ Validate")
                    name = gr.Textbox(label="Config name", placeholder="my_style", scale=2)
                    save = gr.Button("Save to workspace/configs")
                with gr.Row():
                    saved = gr.Dropdown(_saved_configs(studio), label="Saved configs", scale=2, allow_custom_value=True)
                    load = gr.Button("Load")
                with gr.Row():
                    copy = gr.Button("Copy command", elem_id="copy-command")
                    command = gr.Textbox(label="Train the saved config from a terminal", buttons=["copy"],
                                         interactive=False, scale=3, elem_id="config-command")
            with gr.Column(scale=2):
                memory = gr.Markdown(elem_id="memory-estimate")
                reasons = gr.Dataframe(headers=REASON_COLUMNS, label="What the fit chose, and why",
                                       interactive=False, wrap=True, column_widths=["22%", "14%", "34%", "30%"],
                                       elem_id="config-reasons")
        with gr.Accordion("All config keys", open=False):
            gr.Markdown(help_table(list(FIELDS)))
        gr.api(set_config_key, api_name="set_config_key")  # what a form edit does, for scripts: one key into the YAML
        # The YAML the studio last wrote (Fill, Load), and the edits the user was warned about (inside the tab: a
        # component directly in gr.Tabs shows up in its tab bar).
        written, warned = gr.State(""), gr.State(None)

    preset.change(partial(preset_defaults, studio), [preset, dataset], [dataset, base_model, run_name],
                  api_visibility="private")
    # Fill and Load replace the YAML: edits made since the studio last wrote it are only replaced on a second press.
    fill.click(confirm_replace, [yaml_box, written, warned], warned, api_visibility="private").success(
        partial(fill_config, studio), [preset, dataset, base_model, run_name], [status, yaml_box, reasons, memory],
        api_name="fill_config").then(lambda text: text, yaml_box, written, api_visibility="private")
    run_name.input(partial(rename_run, studio), [run_name, yaml_box], [status, yaml_box], api_visibility="private")
    yaml_box.change(partial(save_draft, studio), yaml_box, None, api_visibility="private", show_progress="hidden",
                    trigger_mode="always_last")
    validate.click(partial(validate_config, studio), yaml_box, [status, memory], api_name="validate_config")
    save.click(partial(save_config, studio), [name, yaml_box], [status, saved], api_name="save_config")
    load.click(confirm_replace, [yaml_box, written, warned], warned, api_visibility="private").success(
        partial(load_config, studio), saved, [status, yaml_box, name], api_name="load_config").then(
        lambda text: text, yaml_box, written, api_visibility="private")
    copy.click(partial(copy_command, studio), [saved, yaml_box], [status, command], api_name="copy_command")
    # YAML → form on every change (typing, Fill, Load, a form edit); form → YAML only on the user's own edits
    # (input / blur / submit), so the form's own updates never loop back.
    yaml_box.change(yaml_to_form, yaml_box, [form_status, *form.values()], api_name="config_form",
                    show_progress="hidden")
    for key, widget in form.items():
        triggers = [widget.input] if isinstance(widget, (gr.Dropdown, gr.Checkbox)) else [widget.blur, widget.submit]
        gr.on(triggers, partial(set_config_key, key), [widget, yaml_box], [form_status, yaml_box],
              api_visibility="private", show_progress="hidden")
    return ConfigTab(dataset, yaml_box, hardware, preset, base_model, run_name, status, form[GPU_KEY])


# --- handlers --------------------------------------------------------------------------------------------------------

def gpu_choice(count: int | None = None):
    """The GPUs (num_processes) widget: shown, up to `count`, when more than one CUDA GPU is present (count: the
    number of GPUs; None detects it, which imports torch)."""
    if count is None:
        from studio.distributed import gpu_count
        count = gpu_count()
    return gr.update(visible=count > 1, maximum=max(count, 1))


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


def confirm_replace(text: str, written: str, warned: str | None) -> str | None:
    """Let Fill / Load replace the editor's YAML only if it holds nothing the studio did not write, or on the second
    press for the same edits (a gr.Error stops the event chain and says why)."""
    text = (text or "").strip()
    if not text or text == (written or "").strip() or text == warned:
        return None
    raise gr.Error("The YAML has edits that this would replace. Save them first (Config name → Save), or press the "
                   "button again to replace them.", title="Unsaved edits")


def draft_path(studio: Studio) -> Path:
    return studio.workspace.root / ".drafts" / "config.yaml"


def save_draft(studio: Studio, text: str) -> None:
    """The editor's YAML, kept across page reloads and restarts (an emptied editor keeps the last draft)."""
    if (text or "").strip():
        write_text_atomic(draft_path(studio), text)


def restore_draft(studio: Studio):
    path = draft_path(studio)
    if not path.is_file():
        return gr.skip(), gr.skip()
    return note("Restored the YAML you were editing (a draft kept in the workspace)."), path.read_text("utf-8")


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


# --- the form --------------------------------------------------------------------------------------------------------

def form_widget(key: str):
    """The key's widget, from its schema entry: its help as the info line, a dropdown of its choices, a checkbox for
    true/false, a number within its min/max, a box with one line per item for lists, else a textbox."""
    meta = FIELDS[key].metadata
    base, _ = field_type(key)
    common = dict(label="GPUs" if key == GPU_KEY else key, info=field_help(key), visible=key != GPU_KEY,
                  value=_form_value(_schema_default(key)), elem_id=f"config-form-{key}")
    if "choices" in meta:
        return gr.Dropdown(list(meta["choices"]), **common)
    if base is bool:
        return gr.Checkbox(**common)
    if base in (int, float):
        return gr.Number(minimum=meta.get("min"), maximum=meta.get("max"), precision=0 if base is int else None,
                         step=FORM_STEPS.get(key, 1), **common)
    if base is str:
        return gr.Textbox(**common)
    return gr.Textbox(lines=3, max_lines=12, placeholder="one a line", **common)


@reports_errors(outputs=2)
def set_config_key(key: str, value: str | int | float | bool | list[str] | None, text: str) -> tuple[str, str]:
    """Set one config key in the YAML text: its line is rewritten in place (the other lines and comments are kept),
    or added at the end. Returns (status, the new YAML); an error leaves the YAML as it is."""
    if key not in FIELDS:
        raise StudioError(f"'{key}' is not a config key. See 'All config keys' for the list.")
    text = text or ""
    try:
        data = parse_yaml(text, "The config")
    except StudioError as exc:
        raise StudioError(f"{exc}\nFix the YAML first; the form changes nothing until it parses.") from None
    typed = _typed_value(key, value)
    try:  # a widget left as it was (a blur without an edit) leaves the YAML, comments and spelling as they are
        if coerce_value(key, _effective_value(data, key, _preset_values(data)[0])) == typed:
            return "", gr.skip()
    except StudioError:
        pass
    new = set_yaml_key(text, key, typed)
    return "", gr.skip() if new == text else new


@reports_errors(outputs=1 + len(FORM_KEYS))
def yaml_to_form(text: str):
    """The form's values from the YAML: a key's value there, else its preset's, else the schema default. Keys the
    YAML gives a wrong value keep their widget as it is and are listed in the status."""
    try:
        data = parse_yaml(text or "", "The config")
    except StudioError as exc:
        raise StudioError(f"{exc}\nThe form keeps its values until the YAML parses again.") from None
    defaults, problems = _preset_values(data)
    values = []
    for key in FORM_KEYS:
        try:
            values.append(_form_value(coerce_value(key, _effective_value(data, key, defaults))))
        except StudioError as exc:
            problems.append(str(exc).removeprefix("Config error: "))
            values.append(gr.skip())
    if not problems:
        return ("", *values)
    listed = "\n".join(f"  - {p}" for p in problems)
    return (error(f"The form cannot show every value of this YAML:\n{listed}"), *values)


def set_yaml_key(text: str, key: str, value) -> str:
    """`text` with `key: value`: the key's top-level line (and its block's indented / `- ` lines) replaced, or the
    line appended. Where the layout defeats that (flow mappings, anchors...), the mapping is dumped afresh, one key a
    line as Fill writes it (comments are lost then)."""
    line = _yaml_line(key, value)
    old = parse_yaml(text, "The config")
    expected = {**old, key: parse_yaml(line)[key]}
    lines = text.splitlines()
    starts = [i for i, text_line in enumerate(lines) if (m := _KEY_LINE.match(text_line)) and m["key"] == key]
    if starts:
        start = end = starts[-1]  # YAML keeps the last of duplicate keys
        for i in range(start + 1, len(lines)):
            if lines[i][:1] in (" ", "\t", "-") and lines[i].strip() not in ("---", "..."):
                end = i
            elif lines[i].strip():
                break
        lines[start:end + 1] = [line]
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        lines.append(line)
    new = "\n".join(lines) + "\n"
    try:
        if parse_yaml(new) == expected:
            return new
    except StudioError:
        pass
    return "".join(_yaml_line(k, v) + "\n" for k, v in expected.items())


def _yaml_line(key: str, value) -> str:
    """`key: value` as one flow-style line, as Fill writes it (null for an emptied optional key)."""
    return yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]


def _typed_value(key: str, value):
    """A form widget's value as the key's type (a list from one item a line), checked against the schema."""
    base, optional = field_type(key)
    if base not in (bool, int, float, str) and isinstance(value, str):
        value = [item.strip() for item in value.splitlines() if item.strip()]
    if optional and value in (None, "", []):
        return None
    return coerce_value(key, value)


def _form_value(value):
    """A typed config value as its widget shows it (lists one item a line)."""
    if isinstance(value, list):
        return "\n".join(value)
    return value


def _preset_values(data: dict) -> tuple[dict, list[str]]:
    """The values of the preset the YAML names (none if it names none), and the problem if it names an unknown one."""
    try:
        return (load_preset(str(data["preset"])) if data.get("preset") else {}), []
    except StudioError as exc:
        return {}, [str(exc)]


def _effective_value(data: dict, key: str, preset: dict):
    """What a run gets for `key`: the YAML's value, else the preset's, else the schema default (not yet checked)."""
    return data[key] if key in data else preset.get(key, _schema_default(key))


def _schema_default(key: str):
    f = FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


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
    return studio.index.unique_name(f"{preset}-1")


def _show(value) -> str:
    return "" if value is None else str(value)
