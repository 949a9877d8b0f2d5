"""A run's adapter header as a readable table for the Export tab: family, network, rank, alpha, steps, dataset,
training time, the export self-test, the base model. Read from the adapter file's header (image LoRAs, and an LLM
adapter's safetensors), its adapter_config.json, and the run's events.jsonl / config.yaml where the header is silent.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from studio.config import parse_yaml
from studio.errors import StudioError
from studio.events import FINAL_KINDS, read_events
from studio.ui.common import note
from studio.ui.context import RunInfo

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a peft adapter folder's files

NETWORK_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def header_table(info: RunInfo) -> str:
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
