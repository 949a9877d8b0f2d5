"""The dataset health check on a generated dataset with a known near-duplicate, a blurry image, a small one and a
phone-style JPEG stored sideways (EXIF orientation 6): each is found, the rotated one is bucketed by its displayed
size, steps and time come from the config and earlier runs, the CLI exits 0 (warnings) or 2 (refused), and the
Dataset tab shows it through the API. The run's base model is SD1.5's shipped configs: the check loads no weights."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image, ImageEnhance, ImageFilter

from studio.config import config_from_dict
from studio.data.captions import write_csv_captions
from studio.data.health import check_dataset, laplacian_variance
from studio.data.health_text import report_markdown
from studio.families import get_family
from studio.plan.speed import duration_text, run_signature
from studio.ui.app import build_app, launch

ROOT = Path(__file__).resolve().parent.parent
ORIENTATION = 0x0112
SD15 = get_family("sd15").config_path  # model_index.json and the components' configs of SD1.5: bucket step 64


def blocks(seed: int, size: tuple[int, int]) -> Image.Image:
    """A sharp picture: a random 8x8 grid of colours, scaled up without smoothing."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.NEAREST)


def make_dataset(folder: Path) -> Path:
    folder.mkdir()
    for seed in range(4):
        blocks(seed, (320, 320)).save(folder / f"sharp_{seed}.png")
    # The near-duplicate: sharp_0 re-encoded as JPEG, a little brighter.
    ImageEnhance.Brightness(blocks(0, (320, 320))).enhance(1.05).save(folder / "sharp_0_copy.jpg", quality=80)
    blocks(10, (320, 320)).filter(ImageFilter.GaussianBlur(4)).save(folder / "blurry.png")
    blocks(11, (100, 100)).save(folder / "small.png")
    # Stored 384x224 (landscape) with EXIF orientation 6: displayed 224x384 (portrait), as phones write them.
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    blocks(12, (384, 224)).save(folder / "phone.jpg", quality=90, exif=exif)
    names = sorted(p.name for p in folder.iterdir())
    write_csv_captions(folder / "metadata.csv", {name: ("sks, " if i % 2 else "") + f"blocks, style {i % 3}, {name}"
                                                 for i, name in enumerate(names)})
    return folder


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds")


def run_config(folder, tmp_path, **extra):
    return config_from_dict({"base_model": str(SD15), "train_data_dir": str(folder),
                             "output_dir": str(tmp_path / "runs" / "new"), "resolution": 256, "batch_size": 2,
                             "epochs": 3, "trigger_word": "sks", **extra})


def test_health_check_finds_duplicate_blur_small_and_reads_rotation(dataset, tmp_path):
    report = check_dataset(dataset, run_config(dataset, tmp_path), thumbnails=tmp_path / "thumbs")
    assert not report.blocking and len(report.training) == 8
    assert [(d.first.name, d.second.name) for d in report.duplicates] == [("sharp_0.png", "sharp_0_copy.jpg")]
    assert [f.name for f in report.blurry] == ["blurry.png"]
    assert [f.name for f in report.low_res] == ["small.png"]
    facts = {f.name: f for f in report.images}
    # SD1.5's buckets step by 64 px (8x VAE, 3 UNet downsamplings): portrait 224x384 goes to 192x320.
    assert facts["phone.jpg"].size == (224, 384) and facts["phone.jpg"].bucket == (192, 320)
    assert facts["sharp_1.png"].bucket == (256, 256) and facts["sharp_1.png"].crop == pytest.approx(0)
    # scaled by 192/224 to cover 192 px wide, 384 px become 329: the centre crop cuts 2.8 % of the height
    assert facts["phone.jpg"].crop == pytest.approx(1 - 320 / (384 * 192 / 224))
    with Image.open(facts["phone.jpg"].thumbnail) as thumb:  # thumbnails are upright too
        assert thumb.height > thumb.width
    # 3 epochs × (7 images in 256x256: 4 batches of 2, + 1 in 192x320: 1 batch)
    assert report.steps == 3 * (4 + 1)

    text = report_markdown(report)
    assert "✔ Training accepts this dataset" in text and "Near-duplicates: 1 pair(s)" in text
    assert "| 256x256 | 7 |" in text and "| 192x320 | 1 |" in text
    assert "| blocks | 8 |" in text and "trigger word 'sks': first in 4, later in 0, absent from 4" in text
    assert "time: unknown" in text


def test_time_comes_from_an_earlier_run_of_the_same_size(dataset, tmp_path):
    cfg = run_config(dataset, tmp_path, max_train_steps=300)
    earlier = tmp_path / "runs" / "earlier"
    earlier.mkdir(parents=True)
    events = [{"kind": "plan", "data": {"signature": run_signature(cfg, "sd15", "Test CPU"), "effective_batch": 2}},
              {"kind": "progress", "data": {"it_per_s": 0.5}}]
    (earlier / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n", encoding="utf-8")
    report = check_dataset(dataset, cfg, runs_dir=tmp_path / "runs", device="Test CPU")
    assert report.steps == 300
    assert report.time == f"about {duration_text(300 / 0.5)} (at the speed of run earlier)"  # 10 min
    other_card = check_dataset(dataset, cfg, runs_dir=tmp_path / "runs", device="Another GPU")
    assert other_card.time.startswith("unknown")


def test_blur_measure_orders_sharp_above_blurred():
    sharp = blocks(3, (128, 128)).convert("L")
    assert laplacian_variance(sharp) > 1000 > 100 > laplacian_variance(sharp.filter(ImageFilter.GaussianBlur(3)))


def check_cli(*args) -> int:
    """tools/check_dataset.py's main, in this process (the subprocess would only add seconds of imports)."""
    spec = importlib.util.spec_from_file_location("check_dataset_tool", ROOT / "tools" / "check_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main([str(a) for a in args])


def test_cli_exit_codes(dataset, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"base_model: {SD15}\ntrain_data_dir: elsewhere\noutput_dir: {tmp_path / 'out'}\n"
                      "resolution: 256\nbatch_size: 2\nepochs: 3\n", encoding="utf-8")
    assert check_cli(dataset, "--config", config) == 0
    out = capsys.readouterr().out
    assert "Near-duplicates: 1 pair(s)" in out and "15 steps (3 epoch(s) of 5)" in out

    blocks(20, (320, 320)).save(dataset / "uncaptioned.png")  # training refuses an image without a caption
    assert check_cli(dataset) == 2
    out = capsys.readouterr().out
    assert "Training would refuse this dataset: 1 problem(s)" in out and "uncaptioned.png: no caption" in out

    with pytest.raises(SystemExit) as exit_info:  # a user error: one message, exit code 2
        check_cli(dataset, "--config", tmp_path / "missing.yaml")
    assert exit_info.value.code == 2 and "Config file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def app(tmp_path_factory, free_port):
    """(client, studio) for the studio over a fresh workspace (no demo: the check needs no model weights)."""
    blocks_app, studio = build_app(tmp_path_factory.mktemp("workspace"), with_demo=False)
    _, url, _ = launch(blocks_app, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False, download_files=True), studio
    blocks_app.close()


def test_health_check_in_the_dataset_tab(app):
    client, studio = app
    make_dataset(studio.workspace.datasets / "health-check")
    (studio.workspace.configs / "health-check.yaml").write_text(
        f"base_model: {SD15}\ntrain_data_dir: datasets/elsewhere\noutput_dir: runs/health-check\n"
        "resolution: 256\nbatch_size: 2\nepochs: 3\ntrigger_word: sks\n", encoding="utf-8")
    report, pairs, flagged = client.predict("datasets/health-check", "health-check", api_name="/check_dataset")
    assert "✔ Training accepts this dataset" in report and "15 steps (3 epoch(s) of 5)" in report
    assert "trigger word 'sks'" in report
    assert [item["caption"].split(" ·")[0] for item in pairs["value"]] == ["sharp_0.png", "sharp_0_copy.jpg"]
    assert sorted(item["caption"].split(":")[0] for item in flagged["value"]) == ["blurry.png", "small.png"]
    with Image.open(pairs["value"][0]["image"]) as thumb:  # a thumbnail, not the full picture
        assert max(thumb.size) <= 256

    report, _, _ = client.predict("datasets/health-check", "", api_name="/check_dataset")  # no config: defaults
    assert "the default settings" in report and "time: unknown" in report
    report, _, _ = client.predict("datasets/health-check", "gone", api_name="/check_dataset")
    assert report.startswith("✖") and "no saved config called 'gone'" in report
