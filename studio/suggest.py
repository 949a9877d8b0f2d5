"""Fill a run config from a preset and the detected hardware — the Config tab's "Fill" button, also a small CLI.

`suggest_config(preset, hardware, family, base_model=..., train_data_dir=..., output_dir=...)` returns the config
keys to write (the preset name, the paths, and the memory-bound settings studio.hardware chose for this machine) and
a one-line reason per chosen key. `suggestion_yaml` renders them as the YAML the CLI reads, reasons as comments:

    python -m studio.suggest --preset style --base-model models/sd15 --data datasets/mine --out runs/mine
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from studio.config import IMAGE_TASK, TEXT_TASK, load_preset
from studio.hardware import Hardware, recommend_for

# model_index.json class → family; kept here (not imported from studio.engines) so no diffusers import is needed.
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
LENGTH_KEYS = ("resolution", "max_length")


def detect_family(task_type: str, base_model: str) -> str:
    """'llm' for text runs; for images 'sdxl' or 'sd15' from the model's files, cheaply (no weights loaded)."""
    if task_type == TEXT_TASK:
        return "llm"
    path = Path(base_model or "").expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        cls = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        return PIPELINE_FAMILIES.get(cls, "sd15")
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from studio.engines.single_file import detect_family as from_header  # reads the header only
        from studio.errors import StudioError
        try:
            return from_header(path)
        except StudioError:
            return "sd15"
    return "sdxl" if "xl" in str(base_model).lower() else "sd15"


def llm_shape(base_model: str) -> dict | None:
    """hidden size, layers, vocab and parameter count (billions) of a local transformers model, from config.json."""
    config = Path(base_model or "").expanduser() / "config.json"
    if not config.is_file():
        return None
    c = json.loads(config.read_text(encoding="utf-8"))
    c = c.get("text_config", c)
    try:
        h, layers, vocab = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    inter = int(c.get("intermediate_size") or 4 * h)
    heads = int(c.get("num_attention_heads") or 1)
    kv = int(c.get("num_key_value_heads") or heads)
    attention = 2 * h * h + 2 * h * (h * kv // heads)  # q, o full; k, v shrink with grouped-query attention
    per_layer = attention + 3 * h * inter  # gate, up, down projections
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return {"hidden": h, "layers": layers, "vocab": vocab, "billions": (layers * per_layer + embeddings) / 1e9}


def suggest_config(preset: str, hardware: Hardware, family: str = "auto", *, base_model: str = "",
                   train_data_dir: str = "", output_dir: str = "", **extra) -> tuple[dict, dict]:
    """(values, reasons): the preset's name and the paths, plus the settings that fit `hardware`.

    The preset keeps its intent (rank, learning rate, batch); the heuristics only lower what memory requires, and never
    raise a resolution/max_length the preset set below the hardware limit. Demo presets are sized for the tiny demo
    models and skip the heuristics. `extra` keys are added last (they win).
    """
    preset_values = load_preset(preset)
    task = preset_values.get("task_type", IMAGE_TASK)
    family = detect_family(task, base_model) if family == "auto" else family
    values: dict = {"preset": preset, "base_model": base_model, "train_data_dir": train_data_dir,
                    "output_dir": output_dir}
    reasons: dict = {}
    if preset.startswith("demo"):
        reasons["preset"] = "a demo preset: sized for the tiny demo models, so any machine runs it (no heuristics)"
    else:
        start = {k: preset_values[k] for k in ("batch_size", "lora_rank", "learning_rate") if k in preset_values}
        shape = llm_shape(base_model) if family == "llm" else None
        kw = {"llm_billions": max(shape["billions"], 0.01)} if shape else {}
        rec = recommend_for(hardware, family, start, **kw)
        for key, value in rec.values.items():
            wanted = preset_values.get(key)
            if key in LENGTH_KEYS and wanted is not None and int(wanted) < value:
                value, rec.reasons[key] = int(wanted), f"the preset's {wanted} (below the {value} this machine allows)"
            values[key] = value
            reasons[key] = rec.reasons[key]
        reasons["preset"] = f"{preset} preset, fitted to {hardware.name} ({family})"
    values.update(extra)
    return values, reasons


def suggestion_yaml(values: dict, reasons: dict, header: str = "") -> str:
    """`key: value  # reason` lines, in the flat YAML train.py reads (keys without a value are left out)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in values.items():
        if value is None or value == "":
            continue
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]
        lines.append(text + (f"  # {reasons[key]}" if key in reasons else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from studio.config import preset_names
    from studio.hardware import detect

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=preset_names())
    parser.add_argument("--base-model", default="")
    parser.add_argument("--data", default="", help="train_data_dir")
    parser.add_argument("--out", default="", help="output_dir")
    parser.add_argument("--family", default="auto", choices=["auto", "sd15", "sdxl", "llm"])
    args = parser.parse_args(argv)
    hardware = detect()
    values, reasons = suggest_config(args.preset, hardware, args.family, base_model=args.base_model,
                                     train_data_dir=args.data, output_dir=args.out)
    print(suggestion_yaml(values, reasons, header=f"Suggested for {hardware.summary()}"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
