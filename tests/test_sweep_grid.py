"""Picking the best checkpoint: every adapter of a run (the final one and those saved along the way) is listed, loads
in diffusers / peft, and the strength sweep draws them as one labelled grid (strengths across, checkpoints down, one
seed, gaps between tiles), in Python and through the studio's API."""

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from studio.config import config_from_dict
from studio.errors import StudioError
from studio.events import EventSink
from studio.loop import train
from studio.preview.sweep_grid import BACKGROUND, GAP, MAX_TILE, MIN_TILE, draw_grid
from studio.run_adapters import RunAdapter, evenly_spaced, run_adapters
from studio.ui.app import build_app, launch

SD_RUN, LLM_RUN = "sweep-sd", "sweep-llm"


def value_of(output):
    """A component's value from an output that may be a gr.update(...) dict."""
    return output["value"] if isinstance(output, dict) and output.get("__type__") == "update" else output


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- the grid, on tiny images ----------------------------------------------------------------------------------------

def test_grid_geometry_gaps_and_labels():
    colours = [[(40 * r + 10, 60 * c, 200) for c in range(4)] for r in range(3)]
    tiles = [[Image.new("RGB", (32, 24), colour) for colour in row] for row in colours]
    sheet, layout = draw_grid(tiles, ["step 2", "step 4", "final"], (0.0, 0.5, 1.0, 1.25))
    assert sheet.size == layout.size and layout.tile == (128, 96)  # enlarged 4x, so the labels fit
    image = pixels(sheet)
    background = np.array(BACKGROUND)
    for r in range(3):
        for c in range(4):
            left, top, right, bottom = layout.tile_box(r, c)
            assert (image[top:bottom, left:right] == colours[r][c]).all()  # the tile, whole and in its place
            assert (image[top:bottom, right:right + GAP] == background).all()  # the gap on its right
            assert (image[bottom + layout.band:bottom + layout.band + GAP, left:right] == background).all()  # below
            left, top, right, bottom = layout.label_box(r, c)
            assert (image[top:bottom, left:right] != background).any(axis=2).sum() > 50  # the label is written
            assert layout.tile_at((left + right) / 2, top - 5) == (r, c)
            assert layout.tile_at(right + GAP / 2, top) is None  # a click between tiles means no tile
    assert (image[:GAP] == background).all() and (image[:, :GAP] == background).all()  # the border
    bands = [pixels(sheet.crop(layout.label_box(r, c))) for r, c in ((0, 0), (0, 1), (1, 0))]
    assert (bands[0] != bands[1]).any() and (bands[0] != bands[2]).any()  # each says its strength and step
    assert layout.label(1, 3) == ("step 4", "strength 1.25")
    assert layout.tile_at(*layout.size) is None


def test_large_tiles_are_shrunk_small_ones_enlarged():
    big = [[Image.new("RGB", (1024, 768), "red")] * 2]
    sheet, layout = draw_grid(big, ["final"], (0.0, 1.0))
    assert layout.tile == (MAX_TILE, 384) and sheet.size == (GAP + 2 * (MAX_TILE + GAP), GAP + 384 + layout.band + GAP)
    assert draw_grid([[Image.new("RGB", (MIN_TILE, 64))]], ["final"], (1.0,))[1].tile == (MIN_TILE, 64)


# --- listing a run's adapters ----------------------------------------------------------------------------------------

def test_run_adapters_newest_last_without_temporary_files(tmp_path):
    for name in ("style-step000400.safetensors", "style-step000100.safetensors", "style.safetensors", "notes.txt",
                 ".style-step000500.safetensors.x1y2.tmp", "style-step000200-adapter.zip"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "style-step000300").mkdir()  # a folder without adapter_config.json is no LLM adapter
    adapters = run_adapters(tmp_path, tmp_path / "style.safetensors")
    assert [(a.path.name, a.step, a.label) for a in adapters] == [
        ("style-step000100.safetensors", 100, "step 100"), ("style-step000400.safetensors", 400, "step 400"),
        ("style.safetensors", None, "final")]
    assert [a.label for a in run_adapters(tmp_path, None)] == ["step 100", "step 400"]  # unfinished: steps only


def test_evenly_spaced_keeps_the_first_and_the_newest():
    adapters = [RunAdapter(f"a{i}", i) for i in range(20)]
    assert [a.step for a in evenly_spaced(adapters, 4)] == [0, 6, 13, 19]
    assert evenly_spaced(adapters[:3], 8) == adapters[:3] and evenly_spaced(adapters, 1) == adapters[-1:]


# --- real runs -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(demo, free_port):
    """(client, studio) for an app over the demo's workspace."""
    blocks, studio = build_app(demo.root.parent)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False, download_files=True), studio
    blocks.close()


def trained(demo, name, values):
    """A finished run with adapters saved along the way, in the workspace's runs folder (trained once per session)."""
    out = demo.root.parent / "runs" / name
    if not (out / "events.jsonl").is_file():
        train(config_from_dict({**values, "output_dir": str(out), "sample_every_steps": 0, "sample_prompts": [],
                                "save_steps": 0}), EventSink())
    return out


@pytest.fixture(scope="module")
def sd_run(demo):
    return trained(demo, SD_RUN, {"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir":
                                  str(demo.images), "max_train_steps": 6, "save_adapter_every": 2})


@pytest.fixture(scope="module")
def llm_run(demo):
    return trained(demo, LLM_RUN, {"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir":
                                   str(demo.chat), "max_train_steps": 2, "save_adapter_every": 1})


def test_step_adapters_load_in_diffusers(demo, sd_run):
    import torch
    from diffusers import StableDiffusionPipeline

    adapters = run_adapters(sd_run, sd_run / f"{SD_RUN}.safetensors")
    assert [a.label for a in adapters] == ["step 2", "step 4", "final"]
    pipe = StableDiffusionPipeline.from_pretrained(demo.sd15)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    images = [render()]
    for i, adapter in enumerate(adapters):
        pipe.load_lora_weights(str(adapter.path), adapter_name=f"a{i}")
        pipe.set_adapters([f"a{i}"], [1.0])
        images.append(render())
    assert all(np.abs(images[i] - images[i + 1]).max() > 1e-4 for i in range(3))  # each checkpoint draws its own


def test_step_folders_load_in_peft(demo, llm_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = run_adapters(llm_run, llm_run / LLM_RUN)
    assert [(a.path.name, a.label) for a in adapters] == [(f"{LLM_RUN}-step000001", "step 1"), (LLM_RUN, "final")]
    ids = torch.tensor([[1, 5, 9, 13]])
    logits = []
    for adapter in adapters:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.llama), str(adapter.path))
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-5  # step 1 is not the final adapter


def test_sweep_grid_of_a_real_run(demo, sd_run):
    from studio.preview.images import ImagePreviewer

    adapters = run_adapters(sd_run, sd_run / f"{SD_RUN}.safetensors")
    strengths = (0.0, 0.5, 1.0)
    sheet, layout = ImagePreviewer().strength_sweep(str(demo.sd15), [(a.label, str(a.path)) for a in adapters],
                                                    "a red circle", seed=5, steps=2, strengths=strengths)
    assert layout.rows == ("step 2", "step 4", "final") and layout.strengths == strengths and sheet.size == layout.size
    tiles = [[pixels(sheet.crop(layout.tile_box(r, c))) for c in range(3)] for r in range(3)]
    assert all((tiles[r][0] == tiles[0][0]).all() for r in range(3))  # strength 0: the base model, same seed
    assert all(np.abs(tiles[r][2] - tiles[r + 1][2]).max() > 0 for r in range(2))  # strength 1: each checkpoint
    assert np.abs(tiles[2][2] - tiles[2][0]).max() > 0


def test_least_recently_used_loras_are_unloaded(demo, sd_run, tmp_path, monkeypatch):
    """A sweep loads one LoRA per checkpoint: beyond MAX_LOADED_LORAS the least recently used leave the pipeline
    (and its memory), and load again, unchanged, when asked for."""
    import shutil

    from studio.preview import images

    monkeypatch.setattr(images, "MAX_LOADED_LORAS", 2)
    step = sd_run / f"{SD_RUN}-step000002.safetensors"
    copies = [shutil.copy(step, tmp_path / f"copy{i}.safetensors") for i in range(4)]
    preview, kwargs = images.ImagePreviewer(), dict(prompt="a red circle", seed=1, steps=1)
    first = pixels(preview.generate(str(demo.sd15), [(str(copies[0]), 1.0)], **kwargs))
    for copy in copies[1:]:
        preview.generate(str(demo.sd15), [(str(copy), 1.0)], **kwargs)
    assert len(preview._pipeline(str(demo.sd15)).get_list_adapters()["unet"]) == 2
    assert (pixels(preview.generate(str(demo.sd15), [(str(copies[0]), 1.0)], **kwargs)) == first).all()


# --- through the studio's API ----------------------------------------------------------------------------------------

def test_sweep_endpoint_returns_the_labelled_grid(app, sd_run):
    client, studio = app
    from studio.ui.preview_tab import adapter_choices, sweep_checkpoints

    assert (f"{SD_RUN} · step 2", f"{SD_RUN}/{SD_RUN}-step000002.safetensors") in adapter_choices(studio, image=True)
    assert sweep_checkpoints(studio, SD_RUN)["value"] == [f"{SD_RUN}-step000002.safetensors",
                                                          f"{SD_RUN}-step000004.safetensors", f"{SD_RUN}.safetensors"]
    status, grid = client.predict("", SD_RUN, "a red circle", "", 3, 2, api_name="/strength_sweep")
    assert status.startswith("✔") and "step 2, step 4, final (top to bottom)" in status, status
    width, height = Image.open(grid).size
    assert width == GAP + 5 * (MIN_TILE + GAP) and height > 3 * MIN_TILE  # 5 strengths across, 3 checkpoints down
    assert (sd_run / "sweeps" / f"{SD_RUN}-sweep-seed3.png").is_file()  # the PNG the download button offers

    step = f"{SD_RUN}-step000004.safetensors"
    status, grid = client.predict("", f"{SD_RUN}/{step}", "a red circle", "", 3, 2, [step], "0, 1",
                                  api_name="/strength_sweep")
    assert "step 4 (top to bottom)" in status, status
    width, height = Image.open(grid).size
    assert width == GAP + 2 * (MIN_TILE + GAP) and MIN_TILE < height < 2 * MIN_TILE  # one row, two columns
    status, _ = client.predict("", SD_RUN, "x", "", 3, 2, [], "0, lots", api_name="/strength_sweep")
    assert status.startswith("✖") and "Strengths '0, lots'" in status
    status, _ = client.predict("", SD_RUN, "x", "", 3, 2, ["nope.safetensors"], "", api_name="/strength_sweep")
    assert status.startswith("✖") and "no adapter nope.safetensors" in status

    status, image = client.predict("", f"{SD_RUN}/{step}", 1.0, "", 1.0, "", 1.0, "a red circle", "", 3, 2,
                                   api_name="/generate_image")
    assert f"{SD_RUN} · step 4 × 1" in status and Image.open(image).size == (64, 64)


def test_clicked_tile_gives_its_prompt_tag(sd_run):
    import gradio as gr

    from studio.ui.preview_tab import SweepGrid, choose_tile

    _, layout = draw_grid([[Image.new("RGB", (64, 64))] * 3] * 2, ["step 2", "final"], (0.0, 0.5, 1.0))
    shown = SweepGrid(layout, [f"{SD_RUN}-step000002.safetensors", f"{SD_RUN}.safetensors"], "grid.png")
    left, top, right, bottom = layout.tile_box(0, 1)
    tag = choose_tile(shown, gr.SelectData(None, {"index": [(left + right) // 2, top + 3], "value": None}))
    assert f"`<lora:{SD_RUN}-step000002:0.5>`" in tag and "step 2, strength 0.5" in tag
    left, top, *_ = layout.tile_box(1, 2)
    assert f"<lora:{SD_RUN}:1>" in choose_tile(shown, gr.SelectData(None, {"index": [left, top], "value": None}))


def test_export_tab_lists_and_exports_step_adapters(app, sd_run, llm_run, tmp_path):
    client, studio = app
    assert [a.label for a in studio.run(SD_RUN).adapters] == ["step 2", "step 4", "final"]
    status, files, download = client.predict(SD_RUN, api_name="/export_run")  # the run alone: its final adapter
    assert value_of(download).endswith(f"/{SD_RUN}.safetensors")
    step = f"{SD_RUN}-step000002.safetensors"
    assert step in {f.rsplit("/", 1)[-1] for f in files}
    status, files, download = client.predict(SD_RUN, step, api_name="/export_run")
    assert value_of(download).endswith(f"/{step}")
    assert "saved at step 2" in status and f"<lora:{SD_RUN}-step000002:0.8>" in status, status
    header, listing = client.predict(SD_RUN, step, api_name="/export_details")
    assert f"`{step}`" in header and "| Steps | 2 of 6 |" in header, header
    assert "the adapter saved at step 4" in listing
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    status = client.predict(SD_RUN, str(lora_dir), False, step, api_name="/install_lora")
    assert status.startswith("✔") and (lora_dir / step).read_bytes() == (sd_run / step).read_bytes()
    status = client.predict(SD_RUN, "", step, api_name="/check_lora")
    assert status.startswith(f"✔ {step}: all "), status
    assert "no adapter called nope" in client.predict(SD_RUN, "nope", api_name="/export_run")[0]

    status, *_ = client.predict("", f"{LLM_RUN}/{LLM_RUN}-step000001", 1.0, "hi", [], [], api_name="/chat")
    assert status == f"✔ Adapter {LLM_RUN} · step 1 at strength 1.", status  # the Chat preview takes step folders
    status, files, download = client.predict(LLM_RUN, f"{LLM_RUN}-step000001", api_name="/merge_adapter")
    assert status.startswith("✔") and (llm_run / f"{LLM_RUN}-step000001-merged" / "config.json").is_file(), status
    assert not (llm_run / f"{LLM_RUN}-merged").exists()  # the final adapter's merge is another folder


def test_unknown_pick_is_a_clear_error(app, sd_run):
    from studio.ui.preview_tab import _picked

    with pytest.raises(StudioError, match="has no adapter called nope"):
        _picked(app[1], f"{SD_RUN}/nope")
