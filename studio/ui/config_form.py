"""The Config tab's form: a widget for each of the keys most runs touch, made from the key's schema entry, and the
two-way sync with the YAML (the YAML stays the source of truth: a form edit rewrites one line of it)."""

from __future__ import annotations

import dataclasses
import re

import gradio as gr
import yaml

from studio.config import FIELDS, coerce_value, field_help, field_type, load_preset, parse_yaml
from studio.errors import StudioError
from studio.ui.common import error, reports_errors

# The form: the keys most runs touch, a row each line. Every widget is made from the key's schema entry.
FORM_ROWS = [["base_model", "train_data_dir", "trigger_word", "resolution"],
             ["network_type", "lora_rank", "lora_alpha", "learning_rate"],
             ["batch_size", "gradient_accumulation_steps", "max_train_steps", "epochs"],
             ["mixed_precision", "gradient_checkpointing", "save_steps", "sample_prompts", "num_processes"]]
FORM_KEYS = [key for row in FORM_ROWS for key in row]
GPU_KEY = "num_processes"  # shown as "GPUs", and only where more than one CUDA GPU is present (gpu_choice)
FORM_STEPS = {"learning_rate": 1e-5}  # the spinner's step where 1 makes no sense
_KEY_LINE = re.compile(r"(?P<key>[A-Za-z_][\w-]*)\s*:(\s|$)")  # a top-level `key:` line


# --- the form --------------------------------------------------------------------------------------------------------

def form_widget(key: str):
    """The key's widget, from its schema entry: its help as the info line, a dropdown of its choices, a checkbox for
    true/false, a number within its min/max (a textbox where the key is unset by default), a box with one line per
    item for lists, else a textbox."""
    meta = FIELDS[key].metadata
    base, _ = field_type(key)
    common = dict(label="GPUs" if key == GPU_KEY else key, info=field_help(key), visible=key != GPU_KEY,
                  value=_form_value(_schema_default(key)), elem_id=f"config-form-{key}")
    if "choices" in meta:
        return gr.Dropdown(list(meta["choices"]), **common)
    if base is bool:
        return gr.Checkbox(**common)
    if base in (int, float) and common["value"] is None:  # unset by default: a number box would show a red 0
        return gr.Textbox(placeholder="empty: not set", **common)
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


def form_edit(key: str, value, text: str):
    """A form widget edited by the user: (status, the new YAML, the new YAML again as the user's own edits — which
    Fill and Load then warn about before replacing them); an unchanged YAML updates neither."""
    status, new = set_config_key(key, value, text)
    return status, new, new


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
    """A typed config value as its widget shows it (lists one item a line, 8.0 as 8)."""
    if isinstance(value, list):
        return "\n".join(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
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
