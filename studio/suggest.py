"""Fill a run config from a preset and the detected hardware — the Config tab's "Fill" button, also a small CLI.

`suggest_config(preset, hardware, family, base_model=..., train_data_dir=..., output_dir=...)` returns the config
keys to write (the preset name, the paths, and the memory-bound settings the memory plan, studio/plan/, fitted to this
machine) and a one-line reason per chosen key. `suggestion_yaml` renders them as the YAML the CLI reads, reasons as
comments:

    python -m studio.suggest --preset style --base-model models/sd15 --data datasets/mine --out runs/mine
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import yaml

from studio.families import AUTO, family_names

if TYPE_CHECKING:  # studio.hardware imports torch; the UI imports this module at start-up
    from studio.hardware import Hardware
    from studio.plan.fit import Fitted

def suggest_config(preset: str, hardware: Hardware, family: str = AUTO, *, base_model: str = "",
                   train_data_dir: str = "", output_dir: str = "", **extra) -> tuple[dict, dict, Fitted]:
    """(values, reasons, fitted): the preset's name, the paths, and the memory-bound keys the fit chose for `hardware`.

    The same `fit_config` the CLI runs at start: the preset keeps its intent, the memory plan lowers only what the card
    requires. `extra` keys count as the user's (they win, and the fit leaves them alone).
    """
    from studio.plan.fit import fit_config

    data = {"preset": preset, "base_model": base_model, "train_data_dir": train_data_dir, "output_dir": output_dir,
            **({"model_family": family} if family != AUTO else {}), **extra}
    fitted = fit_config(data, hardware, check_paths=False)
    values = {**{k: v for k, v in data.items() if k != "model_family"}, **{k: getattr(fitted.cfg, k)
                                                                          for k in fitted.reasons}, **extra}
    reasons = {"preset": f"{preset} preset, fitted to {hardware.name} ({fitted.family}): "
                         f"{fitted.plan.summary()}", **fitted.reasons}
    return values, reasons, fitted


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
    from studio.cli import exit_on_user_error
    from studio.config import preset_names
    from studio.hardware import detect

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=preset_names())
    parser.add_argument("--base-model", required=True, help="model folder, hub id or .safetensors checkpoint")
    parser.add_argument("--data", default="", help="train_data_dir")
    parser.add_argument("--out", default="", help="output_dir")
    parser.add_argument("--family", default=AUTO, choices=[AUTO, *family_names()])
    parser.add_argument("--vram-gb", type=float, help="plan for a card with this much memory (vram_budget_gb)")
    args = parser.parse_args(argv)
    hardware = detect()
    extra = {"vram_budget_gb": args.vram_gb} if args.vram_gb else {}
    with exit_on_user_error():
        values, reasons, _ = suggest_config(args.preset, hardware, args.family, base_model=args.base_model,
                                         train_data_dir=args.data, output_dir=args.out, **extra)
    print(suggestion_yaml(values, reasons, header=f"Suggested for {hardware.summary()}"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
