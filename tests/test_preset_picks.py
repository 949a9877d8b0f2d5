"""A preset picks a base model of its family and a dataset of its task's kind, so Fill works at once."""

from studio.ui.config_tab import fill_config, preset_defaults
from studio.ui.context import Studio
from studio.ui.preset_picks import dataset_for, models_for
from studio.workspace import Workspace

SHAPES, CHAT = "demo/datasets/demo-shapes", "demo/datasets/demo-chat"


def test_presets_pick_their_family_and_data(demo):
    studio = Studio(Workspace(demo.root.parent), demo)
    assert models_for(studio, "demo-flux")[0][1] == str(demo.flux)
    assert models_for(studio, "demo-image")[0][1] == str(demo.sd15)
    assert models_for(studio, "llm-chat")[0][1] == str(demo.llama)
    assert dataset_for(studio, "llm-chat", SHAPES) == CHAT  # an LLM preset never keeps the image dataset
    assert dataset_for(studio, "style", CHAT) == SHAPES
    assert dataset_for(studio, "style", SHAPES) == SHAPES
    # what the Config tab does: pick demo-flux while the SD demo is the base, then Fill
    datasets, base, run_name = preset_defaults(studio, "demo-flux", SHAPES)
    assert base["value"] == str(demo.flux) and datasets["value"] == SHAPES
    status, text, _, _ = fill_config(studio, "demo-flux", datasets["value"], base["value"], run_name)
    assert status.startswith("✔") and f"base_model: {demo.flux}" in text, status


def test_a_form_edit_refreshes_the_memory_plan(demo):
    from studio.ui.config_form import form_edit
    from studio.ui.config_tab import refresh_plan

    studio = Studio(Workspace(demo.root.parent), demo)
    _, text, _, plan = fill_config(studio, "demo-image", SHAPES, str(demo.sd15), "plan-run")
    _, edited, recorded = form_edit("resolution", 128, text)
    bigger = refresh_plan(studio, edited, recorded)
    assert "Memory plan" in bigger and bigger != plan and "at 128 px" in bigger
    assert refresh_plan(studio, text, None) == {"__type__": "update"}  # not a form edit: left as it is
