"""Where things live in a workspace: datasets, configs, runs (outputs) and the demo.

A name the user gives becomes a path only through studio.safe_names (`dataset_dir`, `run_dir`, `config_path`,
`dataset_folder`); `resolve` is for paths a config holds, and refuses anything outside the root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError
from studio.safe_names import check_part, inside, workspace_path

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "workspace"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str, what: str = "name") -> str:
    """A new dataset/run/config name: letters, digits, dot, dash, underscore; no path separators."""
    name = check_part((name or "").strip(), what)
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
        return workspace_path(self.root, "dataset", name)

    def run_dir(self, name: str) -> Path:
        return workspace_path(self.root, "run", name)

    def config_path(self, name: str) -> Path:
        return workspace_path(self.root, "config", name)

    def dataset_folder(self, value: str, demo_datasets: Path | None = None) -> Path:
        """The existing dataset folder the Dataset tab's value names: `datasets/<name>`, or a demo dataset's
        `<its folder relative to the root>/<name>`."""
        if not value:
            raise StudioError("Pick a dataset first (or create one).")
        demo_prefix = f"{demo_datasets.relative_to(self.root)}/" if demo_datasets else None
        if demo_prefix and str(value).startswith(demo_prefix):
            folder = inside(demo_datasets, str(value)[len(demo_prefix):], "dataset name")
        else:
            folder = self.dataset_dir(value)
        if not folder.is_dir():
            raise StudioError(f"There is no dataset {folder.name} in {folder.parent}. Pick one from the list (press "
                              "↻ Refresh if it is new).")
        captions = folder / "metadata.csv"
        if captions.is_symlink() and self.root not in captions.resolve().parents:
            raise StudioError(f"{value}/metadata.csv is a link to {captions.resolve()}, outside the workspace; the "
                              "studio reads and writes captions only inside it. Copy the file into the dataset "
                              "instead of linking it.")
        return folder

    def resolve(self, path: str | Path) -> Path:
        """`path` (relative to the root, or absolute) if it lies inside the workspace; else a StudioError."""
        candidate = Path(path).expanduser()
        candidate = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise StudioError(f"{path} is outside the workspace ({self.root}); the studio only reads and writes "
                              "files inside it.")
        return candidate

    def list_dirs(self, folder: Path) -> list[str]:
        """The folders in `folder` the studio may act on (not hidden, no link leaving the workspace)."""
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (not p.is_symlink() or self.root in p.resolve().parents))
