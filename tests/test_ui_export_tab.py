"""The Export tab through its API (gradio_client), over runs trained straight into the demo workspace's runs folder:
the adapter's header as a table, the run's files as download links (nothing that removes one), and an LLM run's
merged model offered as a zip."""

import io
import re
import zipfile
from html import unescape
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from studio.config import config_from_dict
from studio.events import EventSink
from studio.loop import train
from studio.ui.app import build_app, launch

IMAGE_RUN, LLM_RUN = "export-tab-image", "export-tab-llm"
LINK = re.compile(r"<a href='(gradio_api/file=[^']+)' download='([^']+)'>")


@pytest.fixture(scope="module")
def app(demo, free_port):
    """(client, studio, url) for an app over the demo's workspace."""
    blocks, studio = build_app(demo.root.parent)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False, download_files=False), studio, url
    blocks.close()


def trained(studio, name, values):
    """A finished run of a few steps in the workspace's runs folder (trained once per session)."""
    out = studio.workspace.runs / name
    if not (out / "events.jsonl").is_file():
        cfg = config_from_dict({**values, "output_dir": str(out), "max_train_steps": 4, "sample_every_steps": 0,
                                "sample_prompts": [], "save_steps": 0})
        train(cfg, EventSink())
    return out


@pytest.fixture(scope="module")
def image_run(app, demo):
    return trained(app[1], IMAGE_RUN, {"preset": "demo-image", "base_model": str(demo.sd15),
                                       "train_data_dir": str(demo.images), "lora_rank": 4, "lora_alpha": 2})


@pytest.fixture(scope="module")
def llm_run(app, demo):
    return trained(app[1], LLM_RUN, {"preset": "demo-llm", "base_model": str(demo.llama),
                                     "train_data_dir": str(demo.chat), "lora_rank": 4, "lora_alpha": 8})


def table(markdown):
    """The header table's rows as {name: value}."""
    rows = [re.split(r"(?<!\\)\|", line.strip("|")) for line in markdown.splitlines() if line.startswith("| ")]
    return {key.strip(): value.strip() for key, value in rows}


def test_header_table_of_a_finished_image_run(app, image_run):
    client, _, _ = app
    status, files, _ = client.predict(IMAGE_RUN, api_name="/export_run")
    assert f"<lora:{IMAGE_RUN}:0.8>" in status
    header, _ = client.predict(IMAGE_RUN, api_name="/export_details")
    rows = table(header)
    assert rows["Adapter"] == f"`{IMAGE_RUN}.safetensors`"
    assert rows["Family"] == "SD1.5 (`sd15`)" and rows["Network"] == "LoRA"
    assert rows["Rank"] == "4" and rows["Alpha"] == "2" and rows["Steps"] == "4"
    assert rows["Dataset"].startswith("8 images in `demo-shapes`"), rows
    assert re.fullmatch(r"\d+(\.\d)? s|\d+ min \d+ s", rows["Training time"]), rows
    assert rows["Self-test"].startswith("✔ all ") and rows["Base model"] == "`tiny-sd15`"
    assert "{" not in header and "ss_" not in header  # readable names, no raw JSON


def test_file_list_is_download_links_without_a_remove_button(app, image_run):
    client, _, url = app
    _, files, _ = client.predict(IMAGE_RUN, api_name="/export_run")  # the paths, for API clients
    assert [Path(f).name for f in files][:1] == [f"{IMAGE_RUN}.safetensors"]
    assert {Path(f).name for f in files} >= {"config.yaml", "events.jsonl"}
    _, listing = client.predict(IMAGE_RUN, api_name="/export_details")
    links = [(unescape(href), name) for href, name in LINK.findall(listing)]
    assert [name for _, name in links] == [Path(f).name for f in files]
    assert "<button" not in listing and "×" not in listing and "remove" not in listing.lower()
    component = next(c for c in client.config["components"] if c.get("props", {}).get("elem_id") == "export-files")
    assert component["type"] == "html"  # not a gr.File, whose "×" hides a file as if it deleted it
    response = httpx.get(f"{url.rstrip('/')}/{links[0][0]}")  # served from the workspace (allowed_paths)
    assert response.status_code == 200 and response.content == (image_run / f"{IMAGE_RUN}.safetensors").read_bytes()
    outside = httpx.get(f"{url.rstrip('/')}/gradio_api/file=/etc/passwd")
    assert outside.status_code == 403


def test_llm_merged_folder_is_offered_as_a_zip(app, llm_run):
    client, studio, url = app
    header, _ = client.predict(LLM_RUN, api_name="/export_details")
    rows = table(header)
    assert rows["Adapter"] == f"`{LLM_RUN}/`" and rows["Rank"] == "4" and rows["Alpha"] == "8"
    assert rows["Steps"] == "4" and re.fullmatch(r"\d+ samples in `demo-chat`", rows["Dataset"]) and "q_proj" in rows["Target modules"]
    assert rows["Family"].startswith("causal LLM") and rows["Network"] == "LoRA"

    status, files, download = client.predict(LLM_RUN, api_name="/merge_adapter")
    assert status.startswith("✔"), status
    download = download.get("value", download)  # a gr.update(...) of the button, holding the file's data
    assert download["orig_name"] == f"{LLM_RUN}-adapter.zip"
    archive = llm_run / f"{LLM_RUN}-merged.zip"
    assert archive.is_file() and str(archive) in files
    made = archive.stat().st_mtime_ns
    _, listing = client.predict(LLM_RUN, api_name="/export_details")
    href = next(unescape(h) for h, name in LINK.findall(listing) if name == archive.name)
    assert "merged model" in listing
    response = httpx.get(f"{url.rstrip('/')}/{href}")
    assert response.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    client.predict(LLM_RUN, api_name="/export_run")
    assert archive.stat().st_mtime_ns == made  # made once, not again on every visit
    assert not list(llm_run.glob(".*partial*"))


def test_header_table_reads_lycoris_and_stopped_runs(tmp_path):
    """The table from a LyCORIS header (LoKr with conv layers) of a run stopped early, without training one."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from studio.config import IMAGE_TASK
    from studio.events import Event
    from studio.ui.context import RunInfo
    from studio.ui.adapter_header import header_table

    adapter = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_x.lokr_w1": np.zeros((2, 2), np.float32)}, str(adapter), metadata={
        "studio_model_family": "sdxl", "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": "lokr", "conv_dim": "4", "conv_alpha": "2.0", "factor": "8"}),
        "ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_steps": "12", "ss_num_train_images": "1",
        "ss_training_time_s": "125.4", "ss_dataset_dirs": json.dumps({"cats": {"n_repeats": 3, "img_count": 1}}),
        "studio_selftest": "2 problem(s) among 40 keys: ...", "ss_sd_model_name": "sdxl-base | v1"})
    (tmp_path / "events.jsonl").write_text(Event("stopped", 12, 100).to_json() + "\n", encoding="utf-8")
    rows = table(header_table(RunInfo("lokr", tmp_path, IMAGE_TASK, "/models/sdxl", adapter, "stopped")))
    assert rows["Family"] == "SDXL (`sdxl`)" and rows["Network"] == "LoKr (factor 8)"
    assert rows["Rank"] == "16 (conv layers: 4)" and rows["Alpha"] == "8 (conv layers: 2)"
    assert rows["Steps"] == "12 of 100 (stopped early)" and rows["Training time"] == "2 min 5 s"
    assert rows["Dataset"] == "1 image in `cats`, 3 repeats" and rows["Self-test"].startswith("✖ 2 problem(s)")
    assert rows["Base model"] == "`sdxl-base \\| v1`"  # a '|' keeps the row whole
