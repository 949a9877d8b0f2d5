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
from studio.ui.runs_table import register_api as register_runs_api
from studio.ui.train_tab import train_tab
from studio.workspace import Workspace

CSS = """
.studio-progress { display: flex; align-items: center; gap: 12px; font-variant-numeric: tabular-nums; }
.studio-progress progress { flex: 1; height: 14px; accent-color: var(--color-accent); }
.studio-problems { white-space: pre-wrap; font-size: 0.9em; margin: 4px 0 0 0; }
#studio-header h1 { margin-bottom: 0; }
#preview-image img { min-height: 256px; max-width: 100%; object-fit: contain; image-rendering: pixelated; }

/* Refresh buttons: compact, beside their picker, not a 160 px block stretched to the row's height. The Export tab's
   has no class of its own: it is the small button in the row of its run picker. */
.refresh, .row:has(#export-run) > button.sm {
  flex: 0 0 auto !important; min-width: 0 !important; align-self: center; padding: 6px 10px; font-size: 14px; }

/* Runs table actions: buttons at their own height, centred in the row of the run picker. */
.runs-action { flex: 0 0 auto !important; min-width: 0 !important; align-self: center; }

/* Config: the YAML editor wraps long lines (the header comment names the hardware) instead of clipping them.
   CodeMirror sees the white-space and measures wrapped lines as its own line wrapping does. */
#config-yaml .cm-content { white-space: break-spaces !important; overflow-wrap: anywhere; flex-shrink: 1 !important; }

/* Config: markdown tables break lines between words ('memory', not 'memo|ry'); prose tables otherwise use
   overflow-wrap: anywhere, which lets a column shrink below its longest word. */
#memory-estimate :is(th, td) { word-break: normal; overflow-wrap: break-word; }

/* Config, "What the fit chose, and why": key names stay whole. Gradio sizes the columns from column_widths (22% for
   the key: too narrow for gradient_accumulation_steps), inline, on three element sets that must agree — the header
   cells, the hidden sizing row (td) and the body cells — so all three get the same widths here, and the table is at
   least 36rem wide: in a narrower column it scrolls sideways rather than squeeze the other columns to a word a line.
   Table cells ignore calc() mixing % and lengths, so the widths are in container units (cqw) of the table's
   scrolling viewport. */
#config-reasons .virtual-table-viewport { container-type: inline-size; }
#config-reasons .virtual-table-viewport > * {
  --tw: max(100cqw, 36rem); --kw: max(calc(var(--tw) * .22), 13.5rem); --rest: calc(var(--tw) - var(--kw)); }
#config-reasons :is(.header-table, .virtual-body) { width: var(--tw) !important; }
#config-reasons :is(th, td):nth-child(1), #config-reasons .body-cell[data-col="0"] { --w: var(--kw); }
#config-reasons :is(th, td):nth-child(2), #config-reasons .body-cell[data-col="1"] { --w: calc(var(--rest) * .18); }
#config-reasons :is(th, td):nth-child(3), #config-reasons .body-cell[data-col="2"] { --w: calc(var(--rest) * .44); }
#config-reasons :is(th, td):nth-child(4), #config-reasons .body-cell[data-col="3"] { --w: calc(var(--rest) * .38); }
#config-reasons :is(th, td, .body-cell) {
  width: var(--w) !important; min-width: var(--w) !important; max-width: var(--w) !important;
  flex: 0 0 var(--w) !important; }
#config-reasons .body-cell[data-col="0"] span { white-space: nowrap; font-size: 12px; }
/* ...and below 1500 px the column holding the plan and that table goes under the editor, at full width: in its
   2/5 of the row (~480 px at 1400 px) the table would scroll its last column out of view. */
@media (max-width: 1500px) { .row > .column:has(> #config-reasons) { min-width: 100% !important; } }
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
            train_tab(studio, config.yaml, config.guard)
            preview_tab(studio)
            export_tab(studio)
        register_runs_api(studio)  # API-only endpoints stay out of the tabs (a gr.Tabs holds only tabs)
        # The dataset picked in the Dataset tab is the one the Config tab fills in.
        data.dataset.change(lambda value: value, data.dataset, config.dataset, api_visibility="private")
        data.on_page_load(app, studio)
        config.on_page_load(app, studio)
    studio.jobs.resume_queue()  # jobs queued before a restart run now; one that was training is marked interrupted
    return app, studio


def launch(app: gr.Blocks, studio: Studio, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the app; files are served only from the workspace."""
    return app.queue().launch(server_name=host, server_port=port, share=share, auth=auth,
                              allowed_paths=[str(studio.workspace.root)], prevent_thread_lock=prevent_thread_lock,
                              quiet=quiet, css=CSS, footer_links=["api", "settings"], show_error=True)
