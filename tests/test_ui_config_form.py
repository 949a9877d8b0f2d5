"""The Config tab's form, driven through the API (gradio_client): form → YAML, YAML → form, widgets made from the
schema, an invalid YAML edit, and the Copy command for the saved config. The app runs in-process on 127.0.0.1 over a
fresh workspace of its own, without the demo models (nothing here trains or loads a model)."""

import pytest
import yaml
from gradio_client import Client

from studio.config import FIELDS, field_help
from studio.ui.app import build_app, launch
from studio.ui.config_form import FORM_KEYS

YAML = """\
# my style run
preset: style
model_family: sd15
base_model: runwayml/stable-diffusion-v1-5  # a hub id: only looked up when training starts
train_data_dir: datasets/shapes
output_dir: runs/form-run
lora_rank: 8  # the preset's
learning_rate: 1e-4
sample_prompts:
  - a red circle
  - a blue square
# outputs
save_steps: 50
"""
SKIPPED = {"__type__": "update"}  # what the client gets for an output the handler leaves as it is


@pytest.fixture(scope="module")
def app(tmp_path_factory, free_port):
    blocks, studio = build_app(tmp_path_factory.mktemp("form-workspace"), with_demo=False)
    (studio.workspace.datasets / "shapes").mkdir(parents=True)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False), studio
    blocks.close()


def form(client, text):
    """(status, {key: the form's value}) after the YAML editor holds `text`."""
    status, *values = client.predict(text, api_name="/config_form")
    assert len(values) == len(FORM_KEYS)
    return status, dict(zip(FORM_KEYS, values))


def set_key(client, key, value, text):
    return client.predict(key, value, text, api_name="/set_config_key")


def test_form_edit_rewrites_that_key_in_the_yaml(app):
    client, _ = app
    status, text = set_key(client, "lora_rank", 16, YAML)
    assert status == ""
    assert yaml.safe_load(text) == {**yaml.safe_load(YAML), "lora_rank": 16}
    # only that line changes: the other lines and their comments stay as the user wrote them
    assert text.splitlines() == ["lora_rank: 16" if line.startswith("lora_rank:") else line
                                 for line in YAML.splitlines()]

    status, text = set_key(client, "sample_prompts", "a green star\n\na cat, sitting\n", text)  # one a line
    assert status == "" and yaml.safe_load(text)["sample_prompts"] == ["a green star", "a cat, sitting"]
    assert "# outputs" in text and "a red circle" not in text and "save_steps: 50" in text

    status, text = set_key(client, "network_type", "dora", text)  # a key the YAML lacks is added
    assert status == "" and yaml.safe_load(text)["network_type"] == "dora" and text.startswith("# my style run\n")
    _, text = set_key(client, "max_train_steps", 500, text)
    status, text = set_key(client, "max_train_steps", None, text)  # emptied: null (overrides a preset's value)
    assert status == "" and "max_train_steps: null" in text and "500" not in text

    status, same = set_key(client, "learning_rate", 0.0001, YAML)  # the value it has: the YAML is left alone
    assert status == "" and same == SKIPPED

    status, same = set_key(client, "lora_rank", 0, YAML)  # checked against the schema's limits
    assert status.startswith("✖") and "'lora_rank' is 0; it must be at least 1" in status and same == SKIPPED
    status, _ = set_key(client, "network_type", "lora-ish", YAML)
    assert "Allowed values: lora, locon, loha, lokr, dora" in status


def test_yaml_edit_updates_the_form(app):
    client, _ = app
    status, values = form(client, YAML.replace("learning_rate: 1e-4", "learning_rate: 3e-4"))
    assert status == ""
    assert values["learning_rate"] == pytest.approx(3e-4)
    assert values["lora_rank"] == 8 and values["save_steps"] == 50
    assert values["sample_prompts"] == "a red circle\na blue square"
    assert values["epochs"] == 10 and values["lora_alpha"] == "8"  # from the style preset the YAML names
    assert values["network_type"] == "lora" and values["gradient_checkpointing"] is False  # schema defaults
    assert values["max_train_steps"] is None and values["trigger_word"] == ""

    _, text = set_key(client, "lora_rank", 32, YAML)  # and back: a form edit shows in the form
    assert form(client, text)[1]["lora_rank"] == 32


def test_widgets_come_from_the_schema(app):
    client, _ = app
    widgets = {c["props"]["elem_id"][len("config-form-"):]: c for c in client.config["components"]
               if str(c.get("props", {}).get("elem_id")).startswith("config-form-") and c["type"] != "markdown"}
    assert list(widgets) == FORM_KEYS
    for key in ("network_type", "mixed_precision"):
        assert widgets[key]["type"] == "dropdown"
        assert [value for _, value in widgets[key]["props"]["choices"]] == FIELDS[key].metadata["choices"]
    assert widgets["gradient_checkpointing"]["type"] == "checkbox"
    rank = widgets["lora_rank"]
    assert rank["type"] == "number" and (rank["props"]["minimum"], rank["props"]["maximum"]) == (1, 1024)
    assert rank["props"]["precision"] == 0 and widgets["learning_rate"]["props"].get("precision") is None
    assert widgets["sample_prompts"]["type"] == "textbox" and widgets["sample_prompts"]["props"]["lines"] > 1
    steps = widgets["max_train_steps"]  # unset by default: empty, not a number box showing an invalid 0
    assert steps["type"] == "textbox" and not steps["props"].get("value") and "empty" in steps["props"]["placeholder"]
    assert all(widget["props"]["info"] == field_help(key) for key, widget in widgets.items())


def test_invalid_yaml_gives_a_message_and_keeps_the_form(app):
    client, _ = app
    status, values = form(client, YAML + "lora_rank: [8\n")
    assert status.startswith("✖") and "not valid YAML" in status and "Traceback" not in status
    assert all(value == SKIPPED for value in values.values())  # no widget is touched

    status, values = form(client, YAML.replace("lora_rank: 8", "lora_rank: many"))  # one bad value
    assert status.startswith("✖") and "'lora_rank' is 'many', expected a whole number" in status
    assert values["lora_rank"] == SKIPPED and values["learning_rate"] == pytest.approx(1e-4)

    status, text = set_key(client, "lora_rank", 16, "lora_rank: [8\n")  # a form edit cannot break it further
    assert "not valid YAML" in status and text == SKIPPED


def test_copy_command_shows_the_saved_config(app):
    client, studio = app
    status, command = client.predict(None, YAML, api_name="/copy_command")
    assert status.startswith("✖") and "save" in status.lower() and command == ""
    status, command = client.predict("not_saved", YAML, api_name="/copy_command")
    assert "no saved config called 'not_saved'" in status and command == ""

    status, _ = client.predict("form_run", YAML, api_name="/save_config")
    assert status.startswith("✔"), status
    path = studio.workspace.configs / "form_run.yaml"
    status, command = client.predict("form_run", YAML, api_name="/copy_command")
    assert command == f"python train.py --config {path}" and status.startswith("✔")
    status, command = client.predict("form_run", YAML + "epochs: 3\n", api_name="/copy_command")
    assert command == f"python train.py --config {path}" and "differs" in status  # unsaved edits: said so
