"""Auto-labelling (issue #5) on the tiny random-weight CLIP and BLIP models: library, CLI, files on disk."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from studio.data import captioning, label_models
from studio.data.captioning import auto_label, compose_caption
from studio.data.captions import read_csv_captions
from studio.data.label_models import TEXT_BATCH, TransformersClip, available_backends
from studio.data.tagging import VOCAB_DIR, load_vocabulary, rank_tags
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parent.parent
HAND_EDIT = 'my "favourite" one, hand-written, with commas'
OPEN_CLIP_USABLE, OPEN_CLIP_REASON = available_backends()["open_clip"]


@pytest.fixture
def mixed(demo, tmp_path):
    """The 8 demo shapes as jpg/png/webp/bmp, RGBA, grayscale and palette images, plus two broken files."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    sources = sorted(demo.images.glob("*.png"))
    conversions = [("jpg", "RGB"), ("jpeg", "RGB"), ("webp", "RGB"), ("bmp", "RGB"), ("png", "RGBA"), ("png", "L"),
                   ("png", "P"), ("webp", "RGBA")]
    for source, (suffix, mode) in zip(sources, conversions):
        img = Image.open(source).convert(mode)
        if mode == "RGBA":  # left half fully transparent
            alpha = Image.new("L", img.size, 255)
            alpha.paste(0, (0, 0, img.width // 2, img.height))
            img.putalpha(alpha)
        img.save(folder / f"{source.stem}.{suffix}")
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    whole = (folder / f"{sources[0].stem}.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.md").write_text("not an image, not listed")
    return folder


def models(demo) -> dict:
    """The tiny models; threshold -1 keeps every top tag (random weights give near-zero similarities)."""
    return {"clip_model": str(demo.clip), "blip_model": str(demo.blip), "threshold": -1.0}


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


def test_images_become_rgb_with_transparency_on_white(tmp_path):
    clear = Image.new("RGBA", (2, 1), (0, 0, 0, 255))
    clear.putpixel((0, 0), (0, 0, 0, 0))  # transparent black: CLIP should see the white page, not a black blob
    clear.save(tmp_path / "clear.png")
    Image.new("L", (2, 1), 90).save(tmp_path / "grey.png")
    assert list(captioning.load_rgb(tmp_path / "clear.png").getdata()) == [(255, 255, 255), (0, 0, 0)]
    assert list(captioning.load_rgb(tmp_path / "grey.png").getdata()) == [(90, 90, 90)] * 2


# --- the library -----------------------------------------------------------------------------------------------------

def test_labels_mixed_folder_skips_unreadable_and_reports_progress(demo, mixed):
    calls = []
    report = auto_label(mixed, trigger_word="shp", batch_size=3, progress=lambda *a: calls.append(a), **models(demo))
    written = read_csv_captions(mixed / "metadata.csv")
    images = {p.name for p in mixed.iterdir() if p.suffix != ".md"} - {"corrupt.png", "truncated.jpg", "metadata.csv"}
    assert set(written) == set(report.labelled) == images and len(images) == 8
    assert set(report.skipped) == {"corrupt.png", "truncated.jpg"}
    assert all(caption.split(", ")[0] == "shp" and len(caption.split(", ")) > 2 for caption in written.values())
    assert (mixed / "metadata.csv").read_text(encoding="utf-8").startswith("filename,prompt\n")
    # 10 files, 2 unreadable (3rd and 9th): batches of 3 readable images, then the rest
    assert [c[:2] for c in calls] == [(0, 10), (4, 10), (7, 10), (10, 10)] and calls[-1][2] > 0
    assert "corrupt.png" in report.summary() and "truncated.jpg" in report.summary()


def test_existing_captions_are_kept_unless_overwrite_and_quotes_round_trip(demo, mixed):
    target = mixed / "metadata.csv"
    with open(target, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["filename", "prompt"], ["blue_circle.jpg", HAND_EDIT], ["gone.png", "old row"]])
    report = auto_label(mixed, mode="caption", **models(demo))
    captions = read_csv_captions(target)
    assert captions["blue_circle.jpg"] == HAND_EDIT and captions["gone.png"] == "old row"
    assert report.kept == ["blue_circle.jpg"] and len(report.labelled) == 7
    assert '"my ""favourite"" one, hand-written, with commas"' in target.read_text(encoding="utf-8")  # RFC 4180

    again = auto_label(mixed, mode="caption", **models(demo))
    assert again.labelled == {} and read_csv_captions(target) == captions  # nothing left to label: file unchanged

    auto_label(mixed, mode="tags", overwrite=True, **models(demo))
    replaced = read_csv_captions(target)
    assert replaced["blue_circle.jpg"] != HAND_EDIT and replaced["gone.png"] == "old row"


def test_models_load_once_and_see_whole_batches(demo, mixed, monkeypatch):
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
    auto_label(mixed, batch_size=4, **models(demo))
    assert sorted(loads) == ["AutoProcessor", "AutoProcessor", "BlipForConditionalGeneration", "CLIPModel"]
    assert len(text_calls) == math.ceil(len(load_vocabulary()) / TEXT_BATCH)  # the vocabulary once, not per image
    assert image_batches == [4, 4]  # 10 files, 2 unreadable: full batches of 4, broken files never reach a model


def test_sidecars_follow_the_same_keep_rule(demo, mixed):
    (mixed / "red_circle.txt").write_text(HAND_EDIT + "\n", encoding="utf-8")
    report = auto_label(mixed, output_format="txt", mode="tags", trigger_word="shp", **models(demo))
    assert report.kept == ["red_circle.png"] and not (mixed / "metadata.csv").exists()
    assert (mixed / "red_circle.txt").read_text(encoding="utf-8").strip() == HAND_EDIT
    assert (mixed / "blue_circle.txt").read_text(encoding="utf-8").startswith("shp, ")
    assert not (mixed / "corrupt.txt").exists()


def test_missing_model_is_one_clear_error(demo, mixed, tmp_path):
    with pytest.raises(StudioError, match=r"`hf download studio-tests/no-such-clip`.*local folder"):
        auto_label(mixed, mode="tags", clip_model="studio-tests/no-such-clip")
    with pytest.raises(StudioError, match="BLIP model folder .* does not exist"):
        auto_label(mixed, mode="caption", blip_model=str(tmp_path / "nowhere" / "blip"))
    with pytest.raises(StudioError, match="does not hold a CLIP model"):
        auto_label(mixed, mode="tags", clip_model=str(demo.images))
    assert not (mixed / "metadata.csv").exists()


def test_bad_options_are_user_errors(demo, mixed, tmp_path):
    with pytest.raises(StudioError, match="Unknown mode 'wd14'. Allowed: caption\\+tags, caption, tags"):
        auto_label(mixed, mode="wd14")
    with pytest.raises(StudioError, match="holds no images"):
        auto_label(mixed.parent, **models(demo))  # holds only the folder


def test_backends_say_what_is_usable():
    backends = available_backends()
    assert backends["clip"][0] and backends["blip"][0] and set(backends) == {"clip", "open_clip", "blip"}
    assert all(isinstance(usable, bool) and reason for usable, reason in backends.values())


@pytest.mark.skipif(OPEN_CLIP_USABLE, reason="open_clip imports here")
def test_open_clip_missing_is_a_clear_error_only_when_tagging(demo, mixed):
    with pytest.raises(StudioError, match="open_clip backend is not available here: open_clip cannot be imported"):
        auto_label(mixed, mode="tags", clip_backend="open_clip")
    auto_label(mixed, mode="caption", clip_backend="open_clip", **models(demo))  # captions alone never need it


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
    report = auto_label(mixed, mode="tags", clip_backend="open_clip", clip_model=str(folder), threshold=-1.0,
                        device="cpu")
    assert len(report.labelled) == 8 and all(len(c.split(", ")) == 8 for c in report.labelled.values())
    with pytest.raises(StudioError, match="open_clip model 'studio-tests/no-such-clip' is not downloaded"):
        auto_label(mixed, mode="tags", clip_backend="open_clip", clip_model="studio-tests/no-such-clip",
                   overwrite=True)


# --- the command line ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a subprocess CLI run
def test_cli_writes_metadata_and_lists_skipped(demo, mixed):
    result = run_cli("--input", mixed, "--output", mixed / "metadata.csv", "--clip-model", demo.clip, "--blip-model",
                     demo.blip, "--trigger", "shp", "--batch-size", "8", "--threshold", "-1")
    assert result.returncode == 0, result.stderr
    assert "Labelled 8 image(s)" in result.stdout and "corrupt.png" in result.stdout
    assert "img/s" in result.stderr  # the tqdm bar
    captions = read_csv_captions(mixed / "metadata.csv")
    assert len(captions) == 8 and all(c.startswith("shp, ") for c in captions.values())


@pytest.mark.slow  # a subprocess CLI run
def test_cli_txt_format_and_missing_model_exit_code(demo, mixed):
    result = run_cli("--input", mixed, "--format", "txt", "--mode", "caption", "--blip-model", demo.blip)
    assert result.returncode == 0, result.stderr
    assert len(list(mixed.glob("*.txt"))) == 8
    missing = run_cli("--input", mixed, "--mode", "tags", "--clip-model", "studio-tests/no-such-clip")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "error: The CLIP model 'studio-tests/no-such-clip' is not downloaded" in missing.stderr
