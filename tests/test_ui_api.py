"""The studio driven through its API (gradio_client), over the whole demo flow: dataset → config → train →
preview → export, for the image and the LLM demo. The app runs in-process on 127.0.0.1 over the session's demo
workspace."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from safetensors.torch import save_file

from studio.config import load_preset
from studio.ui.app import build_app, launch


@pytest.fixture(scope="module")
def app(demo, free_port):
    """(client, studio) for an app over the demo's workspace (the demo models are already built there)."""
    blocks, studio = build_app(demo.root.parent)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    yield Client(url, verbose=False, download_files=True), studio
    studio.jobs.stop()
    studio.jobs.wait(30)
    blocks.close()


def wait_for_job(client, until=("done", "stopped", "failed"), timeout=120.0, step=None):
    end = time.time() + timeout
    while time.time() < end:
        state = client.predict(api_name="/training_status")
        if state["status"] in until or (step is not None and state["step"] >= step):
            return state
        time.sleep(0.2)
    raise AssertionError(f"job did not reach {until} in {timeout}s: {state}")


def fill(client, preset, dataset, base, run):
    status, text, reasons, memory = client.predict(preset, dataset, base, run, api_name="/fill_config")
    assert status.startswith("✔"), status
    return text, reasons, memory


def value_of(output):
    """A component's value from an output that may be a gr.update(...) dict."""
    return output["value"] if isinstance(output, dict) and output.get("__type__") == "update" else output


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_dataset_upload_auto_label_and_caption_edit(app, demo):
    client, studio = app
    status, _, name_box = client.predict("../escape", api_name="/create_dataset")
    assert "not a dataset name" in status and name_box == {"__type__": "update"}  # refused: left as typed
    status, picked, name_box = client.predict("shapes", api_name="/create_dataset")
    assert status.startswith("✔") and value_of(picked) == "datasets/shapes" and name_box == ""
    images = sorted(demo.images.glob("*.png"))[:4]
    status, _, gallery, table, report, problems, _ = client.predict(
        "datasets/shapes", [handle_file(str(p)) for p in images], api_name="/upload_files")
    assert "Added 4 file(s)" in status and len(gallery) == 4
    assert "4 problem(s)" in report  # the validation report lists every image, each with its fix
    rows = value_of(problems)["data"]
    assert len(rows) == 4 and all("no caption" in " ".join(map(str, row)) for row in rows), rows

    status, _, gallery, table, report, _, _ = client.predict("datasets/shapes", "caption+tags", False, "shp",
                                                             str(demo.clip), str(demo.blip), api_name="/auto_label")
    assert "Labelled 4 image(s)" in status, status
    assert report.startswith("✔") and "4 image(s)" in report
    rows = table["data"]
    assert len(rows) == 4 and all(caption.startswith("shp") for _, caption in rows)

    rows[0][1] = "a hand-written caption, with a comma"
    status, _, _, table, _, _, _ = client.predict("datasets/shapes", {"headers": ["filename", "caption"], "data": rows},
                                                  api_name="/save_captions")
    assert status.startswith("✔"), status
    metadata = (studio.workspace.datasets / "shapes" / "metadata.csv").read_text(encoding="utf-8")
    assert '"a hand-written caption, with a comma"' in metadata
    assert ["a hand-written caption, with a comma"] == [c for f, c in table["data"] if f == rows[0][0]]


def test_text_dataset_upload(app, demo, tmp_path):
    client, studio = app
    client.predict("chats", api_name="/create_dataset")
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                   '{"nonsense": 1}\n', encoding="utf-8")
    status, _, gallery, table, report, _, _ = client.predict(
        "datasets/chats", [handle_file(str(demo.chat / "chat.jsonl")), handle_file(str(bad))], api_name="/upload_files")
    assert "Added 2 file(s)" in status and gallery == []
    assert "1 problem(s)" in report and "notes.jsonl" in report
    assert len(table["data"]) == 7 and "bees" in " ".join(row[1] for row in table["data"])


def test_config_fill_validate_save_load(app, demo):
    client, studio = app
    text, reasons, memory = fill(client, "style", "demo/datasets/demo-shapes", str(demo.sd15), "style-try")
    assert "preset: style" in text and "batch_size:" in text and "#" in text  # each chosen value has its reason
    assert {row[0] for row in reasons["data"]} >= {"batch_size", "resolution", "gradient_checkpointing",
                                                    "mixed_precision"}
    assert "Memory plan" in memory and "| unet weights |" in memory

    status, _ = client.predict("lora_rank: -3\nlerning_rate: 1\n", api_name="/validate_config")
    assert "Config error" in status and "Did you mean 'learning_rate'" in status
    status, _ = client.predict("bad", "preset: style\nlora_rank: -3\n", api_name="/save_config")
    assert "'lora_rank' is -3" in status and not (studio.workspace.configs / "bad.yaml").exists()
    status, _ = client.predict("outside", text.replace("output_dir: ", "output_dir: /tmp/elsewhere #"),
                               api_name="/save_config")
    assert "outside the workspace" in status

    status, saved = client.predict("my_style", text, api_name="/save_config")
    assert status.startswith("✔") and value_of(saved) == "my_style"
    status, loaded, name = client.predict("my_style", api_name="/load_config")
    assert loaded == text and name == "my_style"


def test_image_flow_train_preview_export(app, demo, tmp_path):
    client, studio = app
    text, _, memory = fill(client, "demo-image", "datasets/shapes", str(demo.sd15), "shapes-lora")
    assert "system RAM" in memory or "card" in memory
    status = client.predict(text, api_name="/start_training")
    assert status.startswith("✔"), status
    state = wait_for_job(client)
    assert state["status"] == "done", state
    steps = load_preset("demo-image")["max_train_steps"]
    assert state["step"] == state["total"] == steps and len(state["losses"]) == steps
    assert any("[start]" in line for line in state["log"]) and state["samples"]  # progress events and samples
    adapter = studio.workspace.runs / "shapes-lora" / "shapes-lora.safetensors"
    assert state["files"][0] == str(adapter) and adapter.is_file()

    args = dict(base="", lora2="", strength2=1.0, lora3="", strength3=1.0, prompt="a red circle", negative="",
                seed=3, steps=4, api_name="/generate_image")
    status, half = client.predict(lora1="shapes-lora", strength1=0.5, **args)
    assert status.startswith("✔"), status
    _, full = client.predict(lora1="shapes-lora", strength1=1.0, **args)
    assert np.abs(pixels(half) - pixels(full)).max() > 0  # the strength changes the image
    status, grid = client.predict("", "shapes-lora", "a red circle", "", 3, 4, api_name="/strength_sweep")
    assert status.startswith("✔") and Image.open(grid).size[0] == 8 + 5 * (128 + 8)  # 5 labelled tiles, gaps

    status, files, download = client.predict("shapes-lora", api_name="/export_run")
    assert Path(value_of(download)).name == "shapes-lora.safetensors"
    assert "<lora:shapes-lora:0.8>" in status
    assert {Path(f).name for f in files} >= {"shapes-lora.safetensors", "config.yaml", "events.jsonl"}
    lora_dir = tmp_path / "stable-diffusion-webui" / "models" / "Lora"
    status = client.predict("shapes-lora", str(lora_dir), False, api_name="/install_lora")
    assert "not an existing folder" in status
    lora_dir.mkdir(parents=True)
    status = client.predict("shapes-lora", str(lora_dir), False, api_name="/install_lora")
    assert status.startswith("✔") and (lora_dir / "shapes-lora.safetensors").read_bytes() == adapter.read_bytes()
    assert "already exists" in client.predict("shapes-lora", str(lora_dir), False, api_name="/install_lora")

    status = client.predict("shapes-lora", "", api_name="/check_lora")  # the export self-test, on demand
    assert status.startswith("✔ shapes-lora.safetensors: all ") and "keys load in A1111" in status, status
    broken = tmp_path / "broken.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8)}, str(broken))
    status = client.predict("shapes-lora", str(broken), api_name="/check_lora")
    assert status.startswith("✖") and "no layer lora_unet_no_such_layer" in status, status
    assert "not a .safetensors file" in client.predict("shapes-lora", str(tmp_path), api_name="/check_lora")


def test_second_start_refused_and_cancel_keeps_checkpoint(app, demo):
    client, studio = app
    text, _, _ = fill(client, "demo-image", "demo/datasets/demo-shapes", str(demo.sd15), "long-run")
    long = text.rstrip() + "\nmax_train_steps: 100000\nsave_steps: 0\nsample_every_steps: 0\n"
    assert client.predict(long, api_name="/start_training").startswith("✔")
    state = wait_for_job(client, step=2)
    other, _, _ = fill(client, "demo-image", "demo/datasets/demo-shapes", str(demo.sd15), "other-run")
    refused = client.predict(other, api_name="/start_training")
    assert "already running" in refused
    assert "Cancelling" in client.predict(api_name="/stop_training")
    state = wait_for_job(client, timeout=60)
    assert state["status"] == "stopped" and 2 <= state["step"] < 100_000
    assert (studio.workspace.runs / "long-run" / "checkpoints" / f"step-{state['step']:06d}").is_dir()


def test_training_error_is_a_message(app, demo):
    client, studio = app
    client.predict("empty", api_name="/create_dataset")
    text, _, _ = fill(client, "demo-image", "datasets/empty", str(demo.sd15), "empty-run")
    assert client.predict(text, api_name="/start_training").startswith("✔")
    state = wait_for_job(client)
    assert state["status"] == "failed" and "holds no images" in state["error"]


def test_llm_flow_chat_with_and_without_adapter(app, demo):
    client, studio = app
    text, _, _ = fill(client, "demo-llm", "demo/datasets/demo-chat", str(demo.llama), "chat-lora")
    assert client.predict(text, api_name="/start_training").startswith("✔")
    state = wait_for_job(client)
    assert state["status"] == "done", state
    assert any(s.get("text") is not None and s["step"] > 0 for s in state["samples"])  # sample replies, by step

    status, with_adapter, without, message = client.predict("", "chat-lora", 1.0, "What do bees make?", [], [],
                                                            api_name="/chat")
    assert status.startswith("✔"), status
    assert [m["role"] for m in with_adapter] == ["user", "assistant"] and message == ""
    assert with_adapter[1]["content"] != without[1]["content"]  # the adapter changes the answer
    _, off, base_again, _ = client.predict("", "chat-lora", 0.0, "What do bees make?", [], [], api_name="/chat")
    assert off[1]["content"] == base_again[1]["content"] == without[1]["content"]  # strength 0 = the base model

    status, files, download = client.predict("chat-lora", api_name="/merge_adapter")
    assert Path(value_of(download)).name == "chat-lora-adapter.zip"
    assert status.startswith("✔"), status
    assert (studio.workspace.runs / "chat-lora" / "chat-lora-merged" / "config.json").is_file()


def load_launcher():
    """studio.py (the launcher script; `import studio` is the package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("studio_launcher", Path(__file__).parent.parent / "studio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_binds_loopback_and_warns_without_auth(monkeypatch, tmp_path, capsys):
    import studio.ui.app as ui_app
    from studio.hardware import detect

    calls = []
    monkeypatch.setattr(ui_app, "build_app", lambda root, with_demo: ("app", "studio"))
    monkeypatch.setattr(ui_app, "launch", lambda app, studio, **kw: calls.append(("launch", kw)))
    launcher = load_launcher()
    launcher.main(["--workspace", str(tmp_path), "--no-demo"])
    assert calls[-1][1]["host"] == "127.0.0.1" and calls[-1][1]["auth"] is None and calls[-1][1]["quiet"]
    printed = capsys.readouterr()
    assert "warning" not in printed.err and "demo models" not in printed.err + printed.out
    assert printed.out.splitlines() == ["LoRA Studio: http://127.0.0.1:7860", f"Workspace:   {tmp_path.resolve()}",
                                        f"Device:      {detect().summary()}"]
    launcher.main(["--workspace", str(tmp_path), "--no-demo", "--host", "0.0.0.0"])
    assert "Add --auth user:password" in capsys.readouterr().err
    launcher.main(["--workspace", str(tmp_path), "--no-demo", "--host", "0.0.0.0", "--auth", "me:secret"])
    assert calls[-1][1]["auth"] == ("me", "secret") and "warning" not in capsys.readouterr().err
