"""The current captioners (issue 10): a WD14 tagger (ONNX, onnxruntime) and VLM captions (image-text-to-text), on
tiny models built here — a tagger whose scores are set by hand (studio.demo.captioners.TINY_TAGS) and a random LLaVA.
Also: sidecar captions are kept, a missing model is one message offline, the models are gone after a run, the CLI
and the Dataset tab's API."""

import csv
import gc
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import PreTrainedModel

from studio.data.captioning import LabelModels, auto_label
from studio.data.captions import read_csv_captions
from studio.data.vlm import VlmCaptioner
from studio.data.wd14 import Wd14Tagger, caption_tag, to_model_input
from studio.demo.captioners import TAGGER_SIZE, build_tiny_vlm, build_tiny_wd14
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parent.parent
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
RED_TAGS = ["crimson knight (tiny)", "red theme", "solo", "^_^"]  # character first, then general by score
HAND_WRITTEN = "my own caption, kept"


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return build_tiny_wd14(tmp_path_factory.mktemp("tiny-wd14"))


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture
def colours(tmp_path):
    """red.png, blue.png (square) and green.png (wide: padded to a square on white before tagging)."""
    folder = tmp_path / "colours"
    folder.mkdir()
    for name, colour, size in [("red", RED, (40, 40)), ("blue", BLUE, (24, 24)), ("green", GREEN, (48, 16))]:
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
    return folder


def tagger(folder, general=0.35, character=0.85, rating=False) -> Wd14Tagger:
    return Wd14Tagger(str(folder), general, character, rating, use_cuda=False)


def vlm_models(folder, **settings) -> LabelModels:
    return LabelModels(vlm_model=str(folder), vlm_max_tokens=6, **settings)  # 6 tokens: random text, but quick


def load_tool():
    """tools/auto_label.py as a module, so its main() runs in this process (a subprocess only adds imports)."""
    spec = importlib.util.spec_from_file_location("auto_label_tool", ROOT / "tools" / "auto_label.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- WD14 ------------------------------------------------------------------------------------------------------------

def test_wd14_input_is_bgr_on_a_white_square_at_the_model_size():
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), RED)
    image.putpixel((1, 0), BLUE)
    pixels = to_model_input(image, 2)  # 2x1 → centred on a 2x2 white square; no resize
    assert pixels.dtype == np.float32 and pixels.shape == (2, 2, 3)
    assert pixels[0].tolist() == [[0, 0, 255], [255, 0, 0]]  # BGR: red is (0, 0, 255)
    assert pixels[1].tolist() == [[255, 255, 255]] * 2
    resized = to_model_input(Image.new("RGB", (60, 20), RED), TAGGER_SIZE)
    assert resized.shape == (TAGGER_SIZE, TAGGER_SIZE, 3)
    assert resized[TAGGER_SIZE // 2, :, 2].min() == 255 and resized[0, :, 0].min() == 255  # red middle, white top


def test_wd14_tag_names_keep_kaomoji_underscores():
    assert caption_tag("long_hair") == "long hair" and caption_tag("^_^") == "^_^" and caption_tag("o_o") == "o_o"


def test_wd14_thresholds_ratings_and_characters(tagger_dir):
    red, blue = Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), BLUE)
    # Defaults: general 0.35 keeps solo (0.5) and ^_^ (0.4), not simple_background (0.3); character 0.85 keeps the
    # crimson knight (0.95), not the rose mage (0.6); the rating tags (general 0.8) are dropped.
    assert tagger(tagger_dir)([red, blue]) == [RED_TAGS, ["blue theme", "solo", "^_^"]]
    assert tagger(tagger_dir, general=0.45)([red]) == [["crimson knight (tiny)", "red theme", "solo"]]
    assert tagger(tagger_dir, general=0.25)([blue])[0][-1] == "simple background"
    assert tagger(tagger_dir, character=0.5)([red])[0][:2] == ["crimson knight (tiny)", "rose mage (tiny)"]
    assert tagger(tagger_dir, character=0.99)([red])[0][0] == "red theme"
    assert tagger(tagger_dir, rating=True)([red])[0] == ["general", *RED_TAGS]


def test_wd14_scores_a_batch_as_it_scores_single_images(tagger_dir):
    model = tagger(tagger_dir)
    images = [Image.new("RGB", (40, 40), colour) for colour in (RED, GREEN, BLUE)]
    batch = model.scores(images)
    assert batch.shape == (3, 9)
    np.testing.assert_allclose(batch, np.concatenate([model.scores([image]) for image in images]), atol=1e-6)


def test_wd14_auto_label_writes_tags_after_the_trigger(tagger_dir, colours):
    report = auto_label(colours, mode="wd14", trigger_word="oc", batch_size=2,
                        models=LabelModels(wd14_model=str(tagger_dir)))
    written = read_csv_captions(colours / "metadata.csv")
    assert written == report.labelled and set(written) == {"red.png", "blue.png", "green.png"}
    assert written["red.png"] == ", ".join(["oc", *RED_TAGS])
    assert written["blue.png"] == "oc, blue theme, solo, ^_^"
    # green 48x16 is padded on white to 48x48 (mean colour 2/3 white): solo stays at 0.5 and ^_^ falls to 0.28; on a
    # black padding ^_^ would score 0.47 and be kept
    assert written["green.png"] == "oc, solo"


def test_wd14_bad_files_are_one_clear_message(tagger_dir, colours, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.onnx").write_bytes((tagger_dir / "model.onnx").read_bytes())
    with pytest.raises(StudioError, match=r"does not hold a WD14 model \(no selected_tags.csv in it\)"):
        auto_label(colours, mode="wd14", models=LabelModels(wd14_model=str(partial)))
    with open(partial / "selected_tags.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["tag_id", "name", "category", "count"], [0, "solo", 0, 1]])
    with pytest.raises(StudioError, match="scores 9 tags but .* lists 1: the two files come from different taggers"):
        auto_label(colours, mode="wd14", models=LabelModels(wd14_model=str(partial)))
    with pytest.raises(StudioError, match="general threshold is a score between 0 and 1"):
        LabelModels(general_threshold=35)
    assert not (colours / "metadata.csv").exists()


# --- VLM -------------------------------------------------------------------------------------------------------------

def test_vlm_prompt_is_the_chat_template_with_the_image_and_the_instruction(vlm_dir):
    captioner = VlmCaptioner(str(vlm_dir), "Name the colour.", 6, *_cpu_fp32())
    inputs = captioner._inputs([Image.new("RGB", (40, 30), RED)] * 2)
    prompt = captioner.processor.batch_decode(inputs["input_ids"])[0]
    assert prompt == "<|user|>\n" + "<image>" * 16 + "Name the colour.<|end|>\n<|assistant|>\n"
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 32, 32)


def test_vlm_writes_one_caption_per_image_greedy_and_batched(vlm_dir, colours):
    Image.new("RGB", (40, 40), RED).save(colours / "red_again.png")
    report = auto_label(colours, mode="vlm", trigger_word="oc", batch_size=3, models=vlm_models(vlm_dir))
    written = read_csv_captions(colours / "metadata.csv")
    assert written == report.labelled and len(written) == 4
    for caption in written.values():
        assert caption.startswith("oc, ") and caption[4:].strip() and "\n" not in caption
    assert written["red.png"] == written["red_again.png"]  # greedy: one image, one caption, in any batch position
    again = auto_label(colours, mode="vlm", overwrite=True, batch_size=1, trigger_word="oc",
                       models=vlm_models(vlm_dir))
    assert again.labelled == written  # batch 1 and batch 3 agree (no padding differences)


def captioner_objects() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, (VlmCaptioner, Wd14Tagger, PreTrainedModel))}


def test_vlm_and_wd14_together_and_the_models_are_released(vlm_dir, tagger_dir, colours):
    before = captioner_objects()  # models other tests' fixtures may hold
    report = auto_label(colours, mode="vlm+wd14", models=vlm_models(vlm_dir, wd14_model=str(tagger_dir)))
    assert report.labelled["red.png"].endswith(", " + ", ".join(RED_TAGS))  # the sentence, then the tags
    assert captioner_objects() - before == set()  # nothing holds a captioner after auto_label: training gets the memory


def test_vlm_missing_model_offline_is_one_message(tagger_dir, colours, tmp_path):
    with pytest.raises(StudioError, match=r"The VLM model 'studio-tests/no-such-vlm' is not downloaded.*"
                                          r"`hf download studio-tests/no-such-vlm`"):
        auto_label(colours, mode="vlm", models=LabelModels(vlm_model="studio-tests/no-such-vlm"))
    with pytest.raises(StudioError, match="does not hold a VLM model"):
        auto_label(colours, mode="vlm", models=LabelModels(vlm_model=str(tagger_dir)))
    with pytest.raises(StudioError, match=r"The WD14 model 'studio-tests/no-such-tagger' is not downloaded.*"
                                          r"`hf download studio-tests/no-such-tagger`"):
        auto_label(colours, mode="wd14", models=LabelModels(wd14_model="studio-tests/no-such-tagger"))
    with pytest.raises(StudioError, match="VLM instruction is empty"):
        LabelModels(instruction="  ")
    assert not (colours / "metadata.csv").exists()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_vlm_whose_processor_needs_torchvision_says_so(vlm_dir, colours, tmp_path):
    """A Qwen-VL style processor (it has a torchvision video processor) on an install without torchvision."""
    folder = tmp_path / "needs-torchvision"
    shutil.copytree(vlm_dir, folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config.update(processor_class="Qwen2_5_VLProcessor", video_processor={"video_processor_type":
                                                                           "Qwen2VLVideoProcessor"})
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(StudioError, match=r"needs a package that is not installed here: Qwen2VLVideoProcessor "
                                          r"requires the Torchvision library .*requirements-extras.txt"):
        auto_label(colours, mode="vlm", models=vlm_models(folder))


# --- existing captions -----------------------------------------------------------------------------------------------

def test_sidecar_captions_are_kept_and_carried_into_metadata_csv(tagger_dir, colours):
    (colours / "red.txt").write_text(HAND_WRITTEN + "\n", encoding="utf-8")
    (colours / "blue.txt").write_text("\n", encoding="utf-8")  # empty: counts as no caption
    report = auto_label(colours, mode="wd14", models=LabelModels(wd14_model=str(tagger_dir)))
    written = read_csv_captions(colours / "metadata.csv")
    assert report.kept == ["red.png"] and set(report.labelled) == {"blue.png", "green.png"}
    # training reads metadata.csv instead of the sidecars once it exists, so the kept caption goes in it too
    assert written["red.png"] == HAND_WRITTEN and written["blue.png"] == "blue theme, solo, ^_^"
    assert "Copied 1 caption(s) from .txt sidecars" in report.summary()
    assert (colours / "red.txt").read_text(encoding="utf-8").strip() == HAND_WRITTEN  # the sidecar is untouched

    replaced = auto_label(colours, mode="wd14", overwrite=True, models=LabelModels(wd14_model=str(tagger_dir)))
    assert replaced.kept == [] and read_csv_captions(colours / "metadata.csv")["red.png"] == ", ".join(RED_TAGS)


def test_metadata_csv_captions_are_kept_when_writing_sidecars(tagger_dir, colours):
    with open(colours / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["filename", "prompt"], ["blue.png", HAND_WRITTEN]])
    report = auto_label(colours, mode="wd14", output_format="txt", models=LabelModels(wd14_model=str(tagger_dir)))
    assert report.kept == ["blue.png"] and not (colours / "blue.txt").exists()
    assert (colours / "red.txt").read_text(encoding="utf-8").strip() == ", ".join(RED_TAGS)


# --- command line and studio -----------------------------------------------------------------------------------------

def test_cli_wd14_and_vlm_modes(tagger_dir, vlm_dir, colours, capsys):
    tool = load_tool()
    assert tool.main(["--input", str(colours), "--mode", "wd14", "--wd14-model", str(tagger_dir),
                      "--general-threshold", "0.45", "--rating-tags", "--trigger", "oc"]) == 0
    assert "Labelled 3 image(s)" in capsys.readouterr().out
    assert read_csv_captions(colours / "metadata.csv")["red.png"] == \
        "oc, general, crimson knight (tiny), red theme, solo"
    assert tool.main(["--input", str(colours), "--mode", "vlm", "--vlm-model", str(vlm_dir), "--instruction",
                      "Name the colour.", "--vlm-max-tokens", "4", "--format", "txt", "--batch-size", "2",
                      "--overwrite"]) == 0
    assert "Labelled 3 image(s)" in capsys.readouterr().out
    assert all((colours / f"{name}.txt").read_text(encoding="utf-8").strip() for name in ("red", "blue", "green"))
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--input", str(colours), "--mode", "wd14", "--wd14-model", "studio-tests/no-such-tagger",
                   "--overwrite"])
    assert exit_info.value.code == 2
    assert "error: The WD14 model 'studio-tests/no-such-tagger' is not downloaded" in capsys.readouterr().err


def test_dataset_tab_auto_label_with_wd14_through_the_api(tagger_dir, vlm_dir, colours, tmp_path, free_port):
    from gradio_client import Client

    from studio.ui.app import build_app, launch

    blocks, studio = build_app(tmp_path / "ws", with_demo=False)
    dataset = studio.workspace.datasets / "colours"
    colours.rename(dataset)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        status, *view = client.predict("datasets/colours", "wd14", False, "oc", "", "", str(tagger_dir), 0.35,
                                       0.85, str(vlm_dir), "Name the colour.", api_name="/auto_label")
        assert "Labelled 3 image(s)" in status, status
        table = next(out for out in view if isinstance(out, dict) and out.get("headers") == ["filename", "caption"])
        assert ["red.png", ", ".join(["oc", *RED_TAGS])] in table["data"]
        status, *_ = client.predict("datasets/colours", "vlm", True, "", "", "", "", 0.35, 0.85,
                                    "studio-tests/no-such-vlm", "Name the colour.", api_name="/auto_label")
        assert status.startswith("✖") and "hf download studio-tests/no-such-vlm" in status
    finally:
        blocks.close()


def _cpu_fp32():
    import torch
    return torch.device("cpu"), torch.float32
