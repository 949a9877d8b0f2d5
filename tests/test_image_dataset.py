"""Image dataset validation, captions, buckets: every bad case has its own message, all reported at once."""

import random

import pytest
from PIL import Image

from studio.data.captions import read_captions, write_csv_captions
from studio.data.images import (DatasetError, augment_caption, bucket_batches, fit_to_bucket, inspect_dataset,
                                make_buckets, pick_bucket)


def make_folder(tmp_path, images: dict, csv: str | None):
    for name, size in images.items():
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    if csv is not None:
        (tmp_path / "metadata.csv").write_text(csv, encoding="utf-8")
    return tmp_path


def test_good_dataset_with_quoted_commas(tmp_path):
    make_folder(tmp_path, {"a.png": (80, 64), "b.jpg": (64, 64)},
                'filename,prompt\na.png,"red, square, ""quoted"""\nb.jpg,a photo\n')
    report = inspect_dataset(tmp_path)
    assert report.ok
    assert [(i.path.name, i.caption, i.size) for i in report.items] == [
        ("a.png", 'red, square, "quoted"', (80, 64)), ("b.jpg", "a photo", (64, 64))]


def test_txt_sidecars_when_no_csv(tmp_path):
    make_folder(tmp_path, {"a.png": (64, 64)}, None)
    (tmp_path / "a.txt").write_text("from sidecar\n")
    assert inspect_dataset(tmp_path).items[0].caption == "from sidecar"


@pytest.mark.parametrize("case,expected", [
    ("missing_image", "ghost.png: listed in metadata.csv but there is no such image"),
    ("no_caption", "b.png: no caption. Add a row to metadata.csv"),
    ("empty_caption", "a.png: the caption is empty"),
    ("corrupt", "broken.png: cannot be read as an image"),
    ("truncated", "cut.png: cannot be read as an image"),
    ("unsupported", "anim.gif: .gif images are not supported. Convert it to PNG or JPG"),
    ("tiny", "small.png: 20x20 px is too small"),
    ("bad_header", "the first line must be the header 'filename,prompt'"),
    ("extra_column", "line 2: expected 2 columns (filename,prompt), got 3"),
    ("not_utf8", "is not UTF-8 text"),
])
def test_each_problem_has_its_message(tmp_path, case, expected):
    images = {"a.png": (64, 64)}
    csv = "filename,prompt\na.png,red\n"
    if case == "missing_image":
        csv += "ghost.png,nothing\n"
    elif case == "no_caption":
        images["b.png"] = (64, 64)
    elif case == "empty_caption":
        csv = "filename,prompt\na.png,\n"
    elif case == "tiny":
        images["small.png"] = (20, 20)
        csv += "small.png,tiny\n"
    elif case == "bad_header":
        csv = "file,caption\na.png,red\n"
    elif case == "extra_column":
        csv = "filename,prompt\na.png,red,square\n"
    make_folder(tmp_path, images, csv)
    if case == "corrupt":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
        (tmp_path / "metadata.csv").write_text(csv + "broken.png,x\n")
    elif case == "truncated":
        Image.new("RGB", (128, 128), (1, 2, 3)).save(tmp_path / "cut.png")
        (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
        (tmp_path / "metadata.csv").write_text(csv + "cut.png,x\n")
    elif case == "unsupported":
        Image.new("RGB", (64, 64)).save(tmp_path / "anim.gif")
    elif case == "not_utf8":
        (tmp_path / "metadata.csv").write_bytes("filename,prompt\na.png,caf\xe9\n".encode("latin-1"))
    report = inspect_dataset(tmp_path)
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems


def test_empty_and_missing_folder(tmp_path):
    assert "holds no images" in inspect_dataset(tmp_path).problems[0]
    assert "does not exist" in inspect_dataset(tmp_path / "nope").problems[0]


def test_all_problems_in_one_error(tmp_path):
    make_folder(tmp_path, {"a.png": (64, 64), "b.png": (64, 64), "c.png": (10, 10)},
                "filename,prompt\na.png,ok\nc.png,small\nghost.png,x\n")
    report = inspect_dataset(tmp_path)
    assert len(report.problems) == 3
    with pytest.raises(DatasetError) as err:
        report.raise_if_problems()
    assert "3 problem(s)" in str(err.value) and "b.png" in str(err.value) and "ghost.png" in str(err.value)


def test_captions_round_trip(tmp_path):
    captions = {"a.png": 'comma, "quote", ünïcode', "b.png": "line"}
    write_csv_captions(tmp_path / "metadata.csv", captions)
    assert read_captions(tmp_path) == captions


def test_augment_caption():
    rng = random.Random(0)
    assert augment_caption("red, square", rng, trigger_word="sks") == "sks, red, square"
    shuffled = {augment_caption("a, b, c, d, e", random.Random(i), shuffle_tags=True, keep_tokens=1)
                for i in range(20)}
    assert len(shuffled) > 1 and all(s.startswith("a, ") for s in shuffled)
    assert all(augment_caption("x, y, z", random.Random(i), trigger_word="t", shuffle_tags=True).startswith("t, ")
               for i in range(10))
    drops = [augment_caption("x", random.Random(i), caption_dropout=0.5) for i in range(200)]
    assert 60 < drops.count("") < 140


def test_buckets():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert pick_bucket((600, 900), buckets)[0] < pick_bucket((600, 900), buckets)[1]  # portrait stays portrait
    assert pick_bucket((900, 600), buckets)[0] > pick_bucket((900, 600), buckets)[1]
    assert pick_bucket((700, 700), buckets) == (512, 512)


def test_fit_to_bucket_covers_and_centre_crops():
    img = Image.new("RGB", (300, 200))
    fitted, (top, left) = fit_to_bucket(img, (128, 64))
    assert fitted.size == (128, 64) and top > 0 and left == 0


def test_bucket_batches_deterministic_and_single_size():
    sizes = [(64, 64), (48, 80)] * 5
    a, b = bucket_batches(sizes, 2, seed=7), bucket_batches(sizes, 2, seed=7)
    assert a == b and a != bucket_batches(sizes, 2, seed=8)
    assert sorted(i for batch in a for i in batch) == list(range(10))
    assert all(len({sizes[i] for i in batch}) == 1 for batch in a)
