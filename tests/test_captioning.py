"""Auto-labelling (issue #5) on the tiny random-weight CLIP and BLIP models: library, CLI, files on disk."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from studio.data import label_models
from studio.data.captioning import LabelModels, auto_label, compose_caption
from studio.data.captions import read_csv_captions
from studio.data.label_models import TEXT_BATCH, TransformersClip, available_backends
from studio.data.tagging import VOCAB_DIR, load_vocabulary, rank_tags
from studio.demo.captioners import build_tiny_blip, build_tiny_clip
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parent.parent
HAND_EDIT = 'my "favourite" one, hand-written, with commas'
OPEN_CLIP_USABLE, OPEN_CLIP_REASON = available_backends()["open_clip"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random CLIP and BLIP, built here (nothing else of the demo workspace is needed)."""
    root = tmp_path_factory.mktemp("label-models")
    return SimpleNamespace(clip=build_tiny_clip(root / "clip"), blip=build_tiny_blip(root / "blip"))


@pytest.fixture
def mixed(tmp_path):
    """8 shapes as jpg/png/webp/bmp, RGBA, grayscale and palette images, plus two broken files."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    # Fixed names, so the sorted order of good and broken files below is known.
    stems = [f"{colour}_{shape}" for colour in ("blue", "green", "red", "yellow") for shape in ("circle", "square")]
    conversions = [("jpg", "RGB"), ("jpeg", "RGB"), ("webp", "RGB"), ("bmp", "RGB"), ("png", "RGBA"), ("png", "L"),
                   ("png", "P"), ("webp", "RGBA")]
    for stem, (suffix, mode) in zip(stems, conversions, strict=True):
        img = draw(stem).convert(mode)
        if mode == "RGBA":  # left half fully transparent
            alpha = Image.new("L", img.size, 255)
            alpha.paste(0, (0, 0, img.width // 2, img.height))
            img.putalpha(alpha)
        img.save(folder / f"{stem}.{suffix}")
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    whole = (folder / "blue_circle.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.md").write_text("not an image, not listed")
    return folder


def draw(stem: str) -> Image.Image:
    """A `colour_shape` (e.g. red_circle) on a light background, 96x64."""
    colour, shape = stem.split("_")
    img = Image.new("RGB", (96, 64), (245, 245, 245))
    pen = ImageDraw.Draw(img)
    (pen.ellipse if shape == "circle" else pen.rectangle)((28, 12, 68, 52), fill=colour)
    return img


def models(tiny) -> dict:
    """The tiny models; threshold -1 keeps every top tag (random weights give near-zero similarities)."""
    return {"models": LabelModels(clip_model=str(tiny.clip), blip_model=str(tiny.blip), threshold=-1.0)}


def run_cli(*args):
    return subprocess.run([sys.executable, "tools/auto_label.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# --- tag ranking and vocabulary ---------------------------------------------------------------------------------------

def test_rank_tags_orders_by_cosine_similarity_and_applies_threshold_and_max():
    phrases = ["cat", "dog", "neon", "forest"]
    text = torch.eye(4) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])  # lengths differ: only the direction counts
    # Image 0 has cosine 0.8 with "neon" and 0.6 with "cat". Image 1 (length 1.676): "cat" 0.597, "forest" 0.537,
    # "neon" 0, "dog" -0.597.
    images = torch.tensor([[0.6, 0.0, 0.8, 0.0], [1.0, -1.0, 0.0, 0.9]]) * 7.0
    assert rank_tags(images, text, phrases, threshold=0.5, max_tags=4) == [["neon", "cat"], ["cat", "forest"]]
    assert rank_tags(images, text, phrases, threshold=0.7, max_tags=4) == [["neon"], []]
    assert rank_tags(images, text, phrases, threshold=-1.0, max_tags=1) == [["neon"], ["cat"]]
    assert rank_tags(images, text, phrases, threshold=-1.0, max_tags=9)[1][-1] == "dog"
    assert rank_tags(images, text, phrases, threshold=0.0, max_tags=0) == [[], []]


def test_shipped_vocabulary_has_a_few_hundred_phrases():
    phrases = load_vocabulary()
    assert 200 <= len(phrases) <= 1000 and len(set(phrases)) == len(phrases)
    assert {"cyberpunk", "an oil painting", "neon lighting", "close-up", "highly detailed"} <= set(phrases)
    assert not any(p.startswith("#") or p != p.strip() for p in phrases)
    assert {p.stem for p in VOCAB_DIR.glob("*.txt")} >= {"subjects", "styles", "media", "lighting", "colours",
                                                          "composition", "quality"}


def test_user_vocabulary_skips_comments_blanks_and_repeats(tmp_path):
    (tmp_path / "mine.txt").write_text("# my tags\nrobot arm\n\n  chrome  \nrobot arm\n", encoding="utf-8")
    assert load_vocabulary(tmp_path) == ["robot arm", "chrome"]
    with pytest.raises(StudioError, match="holds no phrases"):
        load_vocabulary(tmp_path / "missing")


def test_caption_puts_trigger_first_then_sentence_then_new_tags():
    assert compose_caption("cyb3rp", "a city at night", ["neon lighting", "a city at night", "cyberpunk"]) == \
        "cyb3rp, a city at night, neon lighting, cyberpunk"
    assert compose_caption("", "", ["red"]) == "red"


# --- the library -----------------------------------------------------------------------------------------------------

def test_labels_mixed_folder_skips_unreadable_and_reports_progress(tiny, mixed):
    calls = []
    report = auto_label(mixed, trigger_word="shp", batch_size=3, progress=lambda *a: calls.append(a), **models(tiny))
    written = read_csv_captions(mixed / "metadata.csv")
    images = {p.name for p in mixed.iterdir() if p.suffix != ".md"} - {"corrupt.png", "truncated.jpg", "metadata.csv"}
    assert set(written) == set(report.labelled) == images and len(images) == 8
    assert set(report.skipped) == {"corrupt.png", "truncated.jpg"}
    assert all(caption.split(", ")[0] == "shp" and len(caption.split(", ")) > 2 for caption in written.values())
    assert (mixed / "metadata.csv").read_text(encoding="utf-8").startswith("filename,prompt\n")
    # 10 files, 2 unreadable (3rd and 8th): batches of 3 readable images, then the rest
    assert [c[:2] for c in calls] == [(0, 10), (4, 10), (7, 10), (10, 10)] and calls[-1][2] > 0
    assert "corrupt.png" in report.summary() and "truncated.jpg" in report.summary()


def test_existing_captions_are_kept_unless_overwrite_and_quotes_round_trip(tiny, mixed):
    target = mixed / "metadata.csv"
    with open(target, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["filename", "prompt"], ["blue_circle.jpg", HAND_EDIT], ["gone.png", "old row"]])
    report = auto_label(mixed, mode="caption", **models(tiny))
    captions = read_csv_captions(target)
    assert captions["blue_circle.jpg"] == HAND_EDIT and captions["gone.png"] == "old row"
    assert report.kept == ["blue_circle.jpg"] and len(report.labelled) == 7
    assert '"my ""favourite"" one, hand-written, with commas"' in target.read_text(encoding="utf-8")  # RFC 4180

    again = auto_label(mixed, mode="caption", **models(tiny))
    assert again.labelled == {} and read_csv_captions(target) == captions  # nothing left to label: file unchanged

    auto_label(mixed, mode="tags", overwrite=True, **models(tiny))
    replaced = read_csv_captions(target)
    assert replaced["blue_circle.jpg"] != HAND_EDIT and replaced["gone.png"] == "old row"


def test_models_load_once_and_see_whole_batches(tiny, mixed, monkeypatch):
    loads, text_calls, image_batches = [], [], []

    def counting_load(cls, model_id, what, **kwargs):
        loads.append(cls.__name__)
        return original_load(cls, model_id, what, **kwargs)

    def counting_texts(self, texts):
        text_calls.append(len(texts))
        return original_texts(self, texts)

    def counting_images(self, images):
        image_batches.append(len(images))
        return original_images(self, images)

    original_load = label_models.load_pretrained
    original_texts, original_images = TransformersClip.encode_texts, TransformersClip.encode_images
    monkeypatch.setattr(label_models, "load_pretrained", counting_load)
    monkeypatch.setattr(TransformersClip, "encode_texts", counting_texts)
    monkeypatch.setattr(TransformersClip, "encode_images", counting_images)
    auto_label(mixed, batch_size=4, **models(tiny))
    assert sorted(loads) == ["AutoProcessor", "AutoProcessor", "BlipForConditionalGeneration", "CLIPModel"]
    assert len(text_calls) == math.ceil(len(load_vocabulary()) / TEXT_BATCH)  # the vocabulary once, not per image
    assert image_batches == [4, 4]  # 10 files, 2 unreadable: full batches of 4, broken files never reach a model


def test_sidecars_follow_the_same_keep_rule(tiny, mixed):
    (mixed / "red_circle.txt").write_text(HAND_EDIT + "\n", encoding="utf-8")
    report = auto_label(mixed, output_format="txt", mode="tags", trigger_word="shp", **models(tiny))
    assert report.kept == ["red_circle.png"] and not (mixed / "metadata.csv").exists()
    assert (mixed / "red_circle.txt").read_text(encoding="utf-8").strip() == HAND_EDIT
    assert (mixed / "blue_circle.txt").read_text(encoding="utf-8").startswith("shp, ")
    assert not (mixed / "corrupt.txt").exists()


def test_missing_model_is_one_clear_error(tiny, mixed, tmp_path):
    with pytest.raises(StudioError, match=r"`hf download studio-tests/no-such-clip`.*local folder"):
        auto_label(mixed, mode="tags", models=LabelModels(clip_model="studio-tests/no-such-clip"))
    with pytest.raises(StudioError, match="BLIP model folder .* does not exist"):
        auto_label(mixed, mode="caption", models=LabelModels(blip_model=str(tmp_path / "nowhere" / "blip")))
    with pytest.raises(StudioError, match="does not hold a CLIP model"):
        auto_label(mixed, mode="tags", models=LabelModels(clip_model=str(mixed)))
    assert not (mixed / "metadata.csv").exists()


def test_bad_options_are_user_errors(tiny, mixed, tmp_path):
    with pytest.raises(StudioError, match="Unknown mode 'blip2'. Allowed: caption\\+tags, caption, tags, wd14, vlm, "
                                          "vlm\\+wd14"):
        auto_label(mixed, mode="blip2")
    with pytest.raises(StudioError, match="batch size must be at least 1"):
        auto_label(mixed, batch_size=0, **models(tiny))
    with pytest.raises(StudioError, match="maximum number of tags must be at least 0"):
        LabelModels(max_tags=-1)
    with pytest.raises(StudioError, match="holds no images"):
        auto_label(mixed.parent, **models(tiny))  # holds only the folder


def test_backends_say_what_is_usable():
    backends = available_backends()
    assert backends["clip"][0] and backends["blip"][0] and backends["wd14"][0] and backends["vlm"][0]
    assert set(backends) == {"clip", "open_clip", "blip", "wd14", "vlm"}
    assert all(isinstance(usable, bool) and reason for usable, reason in backends.values())


@pytest.mark.skipif(OPEN_CLIP_USABLE, reason="open_clip imports here")
def test_open_clip_missing_is_a_clear_error_only_when_tagging(tiny, mixed):
    with pytest.raises(StudioError, match="open_clip backend is not available here: open_clip cannot be imported"):
        auto_label(mixed, mode="tags", models=LabelModels(clip_backend="open_clip"))
    blip_only = LabelModels(clip_backend="open_clip", blip_model=str(tiny.blip))
    auto_label(mixed, mode="caption", models=blip_only)  # captions alone never need it


@pytest.mark.skipif(not OPEN_CLIP_USABLE, reason=OPEN_CLIP_REASON)
def test_open_clip_tags_from_a_local_folder(mixed, tmp_path):
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    folder = tmp_path / "tiny-open-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(open_clip.CLIP(**cfg).state_dict(), folder / "open_clip_pytorch_model.bin")
    report = auto_label(mixed, mode="tags", device="cpu",
                        models=LabelModels(clip_backend="open_clip", clip_model=str(folder), threshold=-1.0))
    assert len(report.labelled) == 8 and all(len(c.split(", ")) == 8 for c in report.labelled.values())
    with pytest.raises(StudioError, match="open_clip model 'studio-tests/no-such-clip' is not downloaded"):
        auto_label(mixed, mode="tags", overwrite=True,
                   models=LabelModels(clip_backend="open_clip", clip_model="studio-tests/no-such-clip"))


# --- the command line ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a subprocess CLI run
def test_cli_writes_metadata_and_lists_skipped(tiny, mixed):
    result = run_cli("--input", mixed, "--output", mixed / "metadata.csv", "--clip-model", tiny.clip, "--blip-model",
                     tiny.blip, "--trigger", "shp", "--batch-size", "8", "--threshold", "-1")
    assert result.returncode == 0, result.stderr
    assert "Labelled 8 image(s)" in result.stdout and "corrupt.png" in result.stdout
    assert "img/s" in result.stderr  # the tqdm bar
    captions = read_csv_captions(mixed / "metadata.csv")
    assert len(captions) == 8 and all(c.startswith("shp, ") for c in captions.values())


@pytest.mark.slow  # a subprocess CLI run
def test_cli_txt_format_and_missing_model_exit_code(tiny, mixed):
    result = run_cli("--input", mixed, "--format", "txt", "--mode", "caption", "--blip-model", tiny.blip)
    assert result.returncode == 0, result.stderr
    assert len(list(mixed.glob("*.txt"))) == 8
    missing = run_cli("--input", mixed, "--mode", "tags", "--clip-model", "studio-tests/no-such-clip")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "error: The CLIP model 'studio-tests/no-such-clip' is not downloaded" in missing.stderr
