"""The studio's error paths, walked through its API (gradio_client): every message is ours, one clear sentence or
list, never a library's traceback, offline hint or tensor-shape dump."""

import pytest
from gradio_client import Client

from studio.config import config_from_dict
from studio.loop import train
from studio.ui.app import build_app, launch

BANNED = ("Traceback", "stacktrace", "local_files_only", "size mismatch", "torch.Size", "File \"")


@pytest.fixture(scope="module")
def app(demo, free_port):
    blocks, studio = build_app(demo.root.parent)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    # An SD1.5 LoRA in the workspace, for the wrong-family case.
    train(config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                            "output_dir": str(studio.workspace.runs / "errors-sd15"), "max_train_steps": 1,
                            "sample_prompts": [], "sample_every_steps": 0}))
    yield Client(url, verbose=False, download_files=True), studio
    blocks.close()


def message(output) -> str:
    return output[0] if isinstance(output, (list, tuple)) else output


def assert_ours(text: str, expected: str) -> None:
    assert text.startswith("✖"), text
    assert expected in text, text
    assert not any(banned in text for banned in BANNED), text


def image_args(**kw):
    return dict(dict(base="", lora1="", strength1=1.0, lora2="", strength2=1.0, lora3="", strength3=1.0,
                     prompt="a red circle", negative="", seed=0, steps=1, api_name="/generate_image"), **kw)


def test_preview_error_paths(app, demo, monkeypatch):
    client, _ = app
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_ours(message(client.predict(**image_args(base="someone/not-cached-model"))),
                "hf download someone/not-cached-model")
    assert_ours(message(client.predict(**image_args(base="/no/such/model"))), "/no/such/model does not exist")
    assert_ours(message(client.predict(**image_args(base=str(demo.sdxl), lora1="errors-sd15"))),
                "is a LoRA for SD1.5, but the base model is SDXL")
    assert_ours(message(client.predict(**image_args(lora1="no-such-run"))), "no-such-run")


def test_config_and_training_error_paths(app, demo):
    client, _ = app
    assert_ours(message(client.predict("lora_rnak: 4\n", api_name="/start_training")), "Did you mean")
    assert_ours(message(client.predict("lora_rank: [1,\n", api_name="/validate_config")), "YAML")
    bad_base = (f"preset: demo-image\nbase_model: /no/such/model\ntrain_data_dir: {demo.images}\n"
                "output_dir: runs/errors-bad-base\n")
    assert_ours(message(client.predict(bad_base, api_name="/validate_config")), "/no/such/model")


def test_export_error_paths(app, tmp_path):
    client, _ = app
    assert_ours(message(client.predict("errors-sd15", str(tmp_path / "nope"), False, api_name="/install_lora")),
                "not an existing folder")
    assert_ours(message(client.predict("errors-sd15", str(tmp_path), api_name="/check_lora")),
                "not a .safetensors file")
