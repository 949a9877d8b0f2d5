"""The built-in demo workspace: tiny models and generated datasets, so every tab works with no download.

The SD1.5 model is pretrained (it draws coloured shapes; the demo dataset teaches it pink); the others are random.

`ensure_demo(root)` builds whatever is missing under `root/demo/` (a few seconds on 2 cores) and reuses it after.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from studio.demo.captioners import build_tiny_blip, build_tiny_clip  # auto-label
from studio.demo.datasets import build_demo_chat, build_demo_images
from studio.demo.diffusion import build_tiny_sdxl, copy_pretrained_sd15
from studio.demo.flux import build_tiny_flux
from studio.demo.llm import build_tiny_llama
from studio.fileio import atomic_dir

# Bump when a builder or the pretrained weights change, so existing demo folders are rebuilt.
DEMO_VERSION = "2"


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def sd15(self) -> Path:
        return self.root / "models" / "tiny-sd15"

    @property
    def sdxl(self) -> Path:
        return self.root / "models" / "tiny-sdxl"

    @property
    def flux(self) -> Path:
        return self.root / "models" / "tiny-flux"

    @property
    def llama(self) -> Path:
        return self.root / "models" / "tiny-llama"

    # --- auto-label demo models (tools/auto_label.py) ---
    @property
    def clip(self) -> Path:
        return self.root / "models" / "tiny-clip"

    @property
    def blip(self) -> Path:
        return self.root / "models" / "tiny-blip"
    # --- end auto-label ---

    @property
    def images(self) -> Path:
        return self.root / "datasets" / "demo-shapes"

    @property
    def chat(self) -> Path:
        return self.root / "datasets" / "demo-chat"

    def builders(self) -> dict[Path, Callable[[Path], Path]]:
        return {self.sd15: copy_pretrained_sd15, self.sdxl: build_tiny_sdxl, self.flux: build_tiny_flux,
                self.llama: build_tiny_llama,
                self.images: build_demo_images, self.chat: build_demo_chat,
                self.clip: build_tiny_clip, self.blip: build_tiny_blip}  # auto-label


def ensure_demo(workspace_root: str | Path) -> DemoPaths:
    paths = DemoPaths(Path(workspace_root) / "demo")
    with _quiet_saving():
        for target, build in paths.builders().items():
            marker = target / ".demo-version"
            if marker.is_file() and marker.read_text() == DEMO_VERSION:
                continue
            with atomic_dir(target) as tmp:  # an interrupted build never leaves a half model behind
                build(tmp)
                (tmp / ".demo-version").write_text(DEMO_VERSION)
    return paths


@contextmanager
def _quiet_saving() -> Iterator[None]:
    """No "Writing model shards" bar for each tiny model saved (a console of bars for a build of seconds)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
