"""The studio: one tab per step of the flow — Dataset → Config → Train → Preview → Export.

`build_app(workspace_root)` composes the tabs (one module each) over one shared `Studio`; `launch(...)` serves it.
Tabs call the same functions as the command line; nothing here trains, validates or loads a model itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from studio.ui.config_tab import config_tab
from studio.ui.context import Studio
from studio.ui.dataset_tab import dataset_tab
from studio.ui.export_tab import export_tab
from studio.ui.preview_tab import preview_tab
from studio.ui.train_tab import train_tab
from studio.workspace import Workspace

CSS = """
.studio-progress { display: flex; align-items: center; gap: 12px; font-variant-numeric: tabular-nums; }
.studio-progress progress { flex: 1; height: 14px; accent-color: var(--color-accent); }
.studio-problems { white-space: pre-wrap; font-size: 0.9em; margin: 4px 0 0 0; }
#studio-header h1 { margin-bottom: 0; }
#preview-image img { min-height: 256px; max-width: 100%; object-fit: contain; image-rendering: pixelated; }
"""


def build_app(workspace_root: str | Path, *, with_demo: bool = True) -> tuple[gr.Blocks, Studio]:
    """The Blocks app over a workspace (created if missing; the demo models are built into it on first use)."""
    workspace = Workspace(workspace_root).ensure()
    # Uploads and gradio's temporary copies stay in the workspace too.
    os.environ["GRADIO_TEMP_DIR"] = str(workspace.root / ".cache" / "gradio")
    demo = None
    if with_demo:
        from studio.demo import ensure_demo  # builds the tiny models the first time (seconds)
        demo = ensure_demo(workspace.root)
    studio = Studio(workspace, demo)

    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as app:
        gr.Markdown(f"# LoRA Studio\nWorkspace: `{workspace.root}` — datasets, configs and runs live here. "
                    "Go left to right: **Dataset → Config → Train → Preview → Export**.",
                    elem_id="studio-header")
        with gr.Tabs():
            data = dataset_tab(studio)
            config = config_tab(studio)
            train_tab(studio, config.yaml)
            preview_tab(studio)
            export_tab(studio)
        # The dataset picked in the Dataset tab is the one the Config tab fills in.
        data.dataset.change(lambda value: value, data.dataset, config.dataset, api_visibility="private")
        config.on_page_load(app, studio)
    return app, studio


def launch(app: gr.Blocks, studio: Studio, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the app; files are served only from the workspace."""
    return app.queue().launch(server_name=host, server_port=port, share=share, auth=auth,
                              allowed_paths=[str(studio.workspace.root)], prevent_thread_lock=prevent_thread_lock,
                              quiet=quiet, css=CSS, footer_links=["api", "settings"], show_error=True)
