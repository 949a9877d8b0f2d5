"""Where things live in a workspace: datasets, configs, runs (outputs) and the demo.

Every path the UI touches goes through `Workspace.resolve`, which refuses anything outside the root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "workspace"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str, what: str = "name") -> str:
    """A dataset/run/config name: letters, digits, dot, dash, underscore; no path separators."""
    name = (name or "").strip()
    if not _SAFE_NAME.match(name) or name in {".", ".."}:
        raise StudioError(f"'{name}' is not a valid {what}. Use letters, digits, '.', '-' or '_' "
                          "(no spaces or slashes), starting with a letter or digit.")
    return name


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def ensure(self) -> "Workspace":
        for folder in (self.datasets, self.configs, self.runs):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def dataset_dir(self, name: str) -> Path:
        return self.datasets / check_name(name, "dataset name")

    def run_dir(self, name: str) -> Path:
        return self.runs / check_name(name, "run name")

    def config_path(self, name: str) -> Path:
        name = name[:-5] if name.endswith(".yaml") else name
        return self.configs / f"{check_name(name, 'config name')}.yaml"

    def resolve(self, path: str | Path) -> Path:
        """`path` (relative to the root, or absolute) if it lies inside the workspace; else a StudioError."""
        candidate = Path(path).expanduser()
        candidate = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise StudioError(f"{path} is outside the workspace ({self.root}); the studio only reads and writes "
                              "files inside it.")
        return candidate

    def list_dirs(self, folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
