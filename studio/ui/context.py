"""What every tab shares: the workspace, the demo models, the one training job, and the previewers.

One `Studio` per process (the GPU is one resource, so every browser tab sees the same job). The UI reads and writes
only inside the workspace: every path from the browser goes through `Studio.dataset_path` / `Studio.run` /
`Workspace.resolve`; base-model paths are the one exception, because the user types them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from studio.config import IMAGE_TASK, RunConfig, parse_yaml
from studio.errors import StudioError
from studio.events import FINAL_KINDS, read_events
from studio.jobs import JobRunner
from studio.run_adapters import RunAdapter, run_adapters
from studio.run_index import RunIndex
from studio.workspace import Workspace, check_name

if TYPE_CHECKING:  # studio.demo loads torch and transformers
    from studio.demo import DemoPaths

DEMO_LABEL = " (demo)"


@dataclass
class RunInfo:
    """A run folder in workspace/runs, as the Preview and Export tabs need it."""
    name: str
    folder: Path
    task_type: str = IMAGE_TASK
    base_model: str = ""
    adapter: Path | None = None  # the exported LoRA file (image) or adapter folder (LLM); None while unfinished
    status: str = "unknown"  # running, done, stopped, failed, or unknown (no events yet)
    adapters: list[RunAdapter] = field(default_factory=list)  # one per saved step, then the final one: newest last
    allow_unsafe_pickle: bool = False  # the run's opt-in for a .ckpt base: its readers (preview, self-test) honour it

    @property
    def is_image(self) -> bool:
        return self.task_type == IMAGE_TASK


@dataclass
class Studio:
    workspace: Workspace
    demo: DemoPaths | None = None
    jobs: JobRunner | None = None  # default: one over the workspace's queue and run index
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _chat: dict = field(default_factory=dict)  # (base, adapter) -> chat previewer

    def __post_init__(self):
        if self.jobs is None:
            self.jobs = JobRunner(RunIndex(self.workspace.root))

    @property
    def index(self) -> RunIndex:
        return self.jobs.index

    # --- datasets ----------------------------------------------------------------------------------------------------
    def dataset_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs; the value is the folder relative to the workspace root."""
        own = [(name, f"datasets/{name}") for name in self.workspace.list_dirs(self.workspace.datasets)]
        demo = []
        if self.demo:
            folder = self.demo.images.parent
            demo = [(name + DEMO_LABEL, str(Path(folder / name).relative_to(self.workspace.root)))
                    for name in self.workspace.list_dirs(folder)]
        return own + demo

    def dataset_path(self, value: str) -> Path:
        """The dataset folder for a dropdown value; only workspace datasets (and the demo's) are accepted."""
        return self.workspace.dataset_folder(value, self.demo.images.parent if self.demo else None)

    def create_dataset(self, name: str) -> str:
        path = self.workspace.dataset_dir(check_name(name, "dataset name"))
        if path.exists():
            raise StudioError(f"A dataset called '{path.name}' already exists. Pick it from the list or use "
                              "another name.")
        path.mkdir(parents=True)
        return f"datasets/{path.name}"

    # --- models -------------------------------------------------------------------------------------------------------
    def model_choices(self, image: bool) -> list[tuple[str, str]]:
        """Base models to offer: the demo's and those that workspace runs used (the user may type any other)."""
        choices: dict[str, str] = {}
        if self.demo:
            demo = [self.demo.sd15, self.demo.sdxl, self.demo.flux] if image else [self.demo.llama]
            choices.update({str(p): p.name + DEMO_LABEL for p in demo})
        for run in self.runs():
            if run.is_image == image and run.base_model:
                choices.setdefault(run.base_model, Path(run.base_model).name)
        return [(label, value) for value, label in choices.items()]

    # --- runs ---------------------------------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        return [self.run(name) for name in self.workspace.list_dirs(self.workspace.runs)
                if (self.workspace.runs / name / "config.yaml").is_file()]

    def run_choices(self, image: bool | None = None, finished: bool = False) -> list[str]:
        return [r.name for r in self.runs()
                if (image is None or r.is_image == image) and (not finished or r.adapter is not None)]

    def run(self, name: str) -> RunInfo:
        if not name:
            raise StudioError("Pick a run first (train one in the Train tab).")
        folder = self.workspace.run_dir(name)
        config = folder / "config.yaml"
        if not config.is_file():
            raise StudioError(f"There is no run called '{name}' in {self.workspace.runs}.")
        data = parse_yaml(config.read_text(encoding="utf-8"), str(config))
        info = RunInfo(name, folder, data.get("task_type") or IMAGE_TASK, str(data.get("base_model") or ""),
                       allow_unsafe_pickle=bool(data.get("allow_unsafe_pickle")))
        record = self.index.get(name) if self.index else None
        events = read_events(folder / "events.jsonl")
        finals = [e for e in events if e.kind in FINAL_KINDS]
        info.status = record.status if record else finals[-1].kind if finals else info.status
        if finals and info.status in FINAL_KINDS:  # the first file of the last outcome is the adapter
            files = [Path(f) for f in finals[-1].data.get("files", [])]
            info.adapter = next((f for f in files if f.exists() and self._inside(f)), None)
        info.adapters = run_adapters(folder, info.adapter)
        return info

    def _inside(self, path: Path) -> bool:
        try:
            self.workspace.resolve(path)
            return True
        except StudioError:
            return False

    # --- configs ------------------------------------------------------------------------------------------------------
    def check_confined(self, cfg: RunConfig) -> None:
        """Runs started from the UI read data from and write outputs to the workspace only."""
        for key in ("train_data_dir", "metadata_path", "output_dir", "logging_dir", "init_lora"):
            value = getattr(cfg, key)
            if value:
                try:
                    self.workspace.resolve(value)
                except StudioError:
                    raise StudioError(f"'{key}' is {value}, outside the workspace ({self.workspace.root}). In the "
                                      "studio, data and outputs live in the workspace; use train.py for other "
                                      "places.") from None
        out = self.workspace.resolve(cfg.output_dir or self.workspace.runs)
        if out.parent != self.workspace.runs:  # the queue and the Runs table know a run by its folder's name
            raise StudioError(f"'output_dir' is {cfg.output_dir}; in the studio a run's outputs go to "
                              f"{self.workspace.runs}/<run name>. Set the run name in the Config tab (or "
                              "output_dir: runs/<run name>); use train.py for other places.")

    # --- shared heavy objects, loaded on first use --------------------------------------------------------------------
    @cached_property
    def hardware(self):
        from studio.hardware import detect  # imports torch: not on the start-up path
        return detect()

    @cached_property
    def image_previewer(self):
        from studio.preview.images import ImagePreviewer
        return ImagePreviewer()

    def chat_previewer(self, base_model: str, adapter: str):
        """One chat previewer per (base model, adapter); the last one is kept (an LLM is large)."""
        from studio.preview.chat import ChatPreview
        key = (base_model, adapter)
        with self._lock:
            if key not in self._chat:
                self._chat.clear()
                self._chat[key] = ChatPreview(adapter, base_model or None)
            return self._chat[key]
