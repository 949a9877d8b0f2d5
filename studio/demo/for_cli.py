"""The demo from the command line: `python train.py --config presets/demo-image.yaml` names no model, data or output
folder, so a demo preset gets the demo workspace's (built there first if missing, as the studio does on its first
start): the demo model of the preset's family, the demo dataset of its task, and workspace/runs/<preset>."""

from __future__ import annotations

from pathlib import Path

from studio.config import PRESETS_DIR, TEXT_TASK, load_preset
from studio.families import AUTO, detect_family

PATH_KEYS = ("base_model", "train_data_dir", "output_dir")


def is_demo_preset(name: str) -> bool:
    return name.startswith("demo")


def with_demo_paths(data: dict, config: Path, workspace_root: Path) -> tuple[dict, str]:
    """(data with the demo's paths for the keys it leaves empty, a line saying which); `data` as it is unless it
    names a demo preset (or `config` is one: presets/demo-image.yaml) and leaves one of PATH_KEYS empty."""
    config = Path(config).resolve()
    preset = str(data.get("preset") or (config.stem if config.parent == PRESETS_DIR.resolve() else ""))
    if not is_demo_preset(preset) or all(data.get(key) for key in PATH_KEYS):
        return data, ""
    from studio.demo import ensure_demo  # loads torch and the model libraries: only for a demo run

    values = {**load_preset(preset), **data}
    demo = ensure_demo(workspace_root)
    text = values.get("task_type") == TEXT_TASK
    family = values.get("model_family", AUTO)
    models = [demo.llama] if text else [demo.sd15, demo.sdxl, demo.flux]
    base = next((m for m in models if family == AUTO or detect_family(values.get("task_type", ""), str(m)).name
                 == family), models[0])
    found = {"base_model": str(base), "train_data_dir": str(demo.chat if text else demo.images),
             "output_dir": str(workspace_root / "runs" / preset)}
    filled = {key: found[key] for key in PATH_KEYS if not data.get(key)}
    lines = "".join(f"\n  {key}: {value}" for key, value in filled.items())
    return {**data, "preset": preset, **filled}, f"The {preset} preset trains the demo (in {demo.root}):{lines}"
