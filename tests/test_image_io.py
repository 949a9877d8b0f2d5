"""Images read as they look (studio.data.image_io): each case is a generated file whose expected pixels are known."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from studio.config import ConfigError, config_from_dict
from studio.data.captions import write_csv_captions
from studio.data.dataset_files import DELETE_FILE
from studio.data.image_io import ImageReadError, image_size, read_image
from studio.data.images import inspect_dataset, load_pixels

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes = b"") -> bytes:
    """A PNG written chunk by chunk, for what Pillow cannot save (16-bit RGB, a header with no pixels after it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(raw_rows)) if raw_rows else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def caption_all(folder, names):
    write_csv_captions(folder / "metadata.csv", {name: "a caption" for name in names})


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    stored = Image.new("RGB", (160, 96), BLUE)  # landscape as stored; the top-left corner red
    stored.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a phone held upright
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)

    assert image_size(path) == (96, 160)  # portrait, as displayed
    upright = np.asarray(read_image(path))
    assert upright.shape == (160, 96, 3)
    assert np.abs(upright[10, -10].astype(int) - RED).max() < 30  # the stored top-left is now the top-right
    assert np.abs(upright[10, 10].astype(int) - BLUE).max() < 30

    caption_all(tmp_path, ["phone.jpg"])
    assert inspect_dataset(tmp_path).items[0].size == (96, 160)  # the bucket is chosen from the displayed size
    pixels, _ = load_pixels(path, (96, 160))
    assert pixels[0, 5, -5] > 0.8 and pixels[2, 5, -5] < -0.8  # red in the top-right of the training tensor


def test_16_bit_grey_ramp_keeps_its_tones(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"

    pixels, _ = load_pixels(path, (256, 64))
    assert abs(pixels.mean().item()) < 0.01  # Pillow's own convert("RGB") gives +0.996: almost all white
    assert pixels.min().item() == -1.0 and pixels.max().item() == 1.0
    grey = np.asarray(read_image(path))[0, :, 0]
    assert np.abs(grey.astype(int) - np.linspace(0, 255, 256)).max() <= 1  # the ramp, step for step


def test_16_bit_rgb_png_is_scaled_to_8_bit(tmp_path):
    red16 = np.linspace(0, 65535, 64).round().astype(">u2")
    row = np.zeros((64, 3), dtype=">u2")
    row[:, 0] = red16
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(64, 64, 16, 2, (b"\x00" + row.tobytes()) * 64))

    image = np.asarray(read_image(path)).astype(int)
    assert np.abs(image[0, :, 0] - np.linspace(0, 255, 64)).max() <= 1 and image[..., 1:].max() == 0


def test_transparency_is_composited_on_the_background(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (255, 0, 0, 0)  # fully transparent red: must not show
    rgba[:, 32:48] = (0, 255, 0, 255)  # opaque green
    rgba[:, 48:] = (255, 0, 0, 128)  # half-transparent red
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)

    on_white = np.asarray(read_image(path)).astype(int)
    assert (on_white[:, :32] == WHITE).all() and (on_white[:, 32:48] == (0, 255, 0)).all()
    assert np.abs(on_white[0, 60] - (255, 127, 127)).max() <= 1
    assert (np.asarray(read_image(path, background="#0000ff"))[:, :32] == BLUE).all()
    black, _ = load_pixels(path, (64, 64), background="black")
    assert (black[:, :, :32] == -1).all()  # training sees the configured colour too

    grey_alpha = Image.fromarray(rgba[..., [1, 3]], "LA")  # grey + alpha: transparent half on white as well
    grey_alpha.save(tmp_path / "la.png")
    assert (np.asarray(read_image(tmp_path / "la.png"))[:, :32] == WHITE).all()


def test_palette_transparency_is_composited(tmp_path):
    indices = np.zeros((64, 64), dtype=np.uint8)
    indices[:, 32:] = 1
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)  # index 0 black, but transparent
    path = tmp_path / "sprite.png"
    palette_image.save(path, transparency=0)

    image = np.asarray(read_image(path))
    assert (image[:, :32] == WHITE).all() and (image[:, 32:] == RED).all()


def test_image_over_the_pixel_limit_is_a_problem_naming_the_file(tmp_path):
    Image.new("RGB", (2000, 1000), BLUE).save(tmp_path / "big.png")
    Image.new("RGB", (64, 64), RED).save(tmp_path / "fine.png")
    # A 20000 x 20000 header (400 MP, over Pillow's own 179 MP limit): refused before any decoding.
    (tmp_path / "bomb.png").write_bytes(png_bytes(20000, 20000, 8, 2))
    caption_all(tmp_path, ["big.png", "fine.png", "bomb.png"])

    with pytest.raises(ImageReadError, match=r"big\.png: 2000x1000 px .* over the limit of 1 \(max_image_pixels\)"):
        read_image(tmp_path / "big.png", max_pixels=1_000_000)
    with pytest.raises(ImageReadError, match=r"bomb\.png: 20000x20000 px is 400 megapixels, over the limit of 128"):
        image_size(tmp_path / "bomb.png")

    report = inspect_dataset(tmp_path, max_pixels=1_000_000)
    assert [(i.file, i.fix) for i in report.issues] == [("big.png", DELETE_FILE), ("bomb.png", DELETE_FILE)]
    assert "max_image_pixels" in report.problems[0] and [i.path.name for i in report.items] == ["fine.png"]


def test_corrupt_image_is_reported_as_unreadable_not_uncaptioned(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (256, 256), RED).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:400])

    report = inspect_dataset(tmp_path)  # neither has a caption either
    assert [(i.file, i.fix) for i in report.issues] == [("broken.png", DELETE_FILE), ("cut.jpg", DELETE_FILE)]
    assert all("cannot be read as an image" in p and "no caption" not in p for p in report.problems)


def test_background_and_limit_are_config_keys():
    base = {"base_model": "m", "train_data_dir": "d", "output_dir": "o"}
    cfg = config_from_dict({**base, "image_background": "#112233", "max_image_pixels": 50_000_000},
                           check_paths=False)
    assert (cfg.image_background, cfg.max_image_pixels) == ("#112233", 50_000_000)
    with pytest.raises(ConfigError, match="'image_background' is 'grey', expected white, black or a colour as"):
        config_from_dict({**base, "image_background": "grey"}, check_paths=False)


def test_thumbnails_show_the_image_as_read_and_follow_changes(tmp_path):
    from studio.data.thumbnails import thumbnails

    rgba = np.zeros((600, 300, 4), dtype=np.uint8)  # portrait, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cache = tmp_path / "cache"
    made = thumbnails([tmp_path / "cutout.png", tmp_path / "broken.png"], cache)
    assert list(made) == ["cutout.png"]  # the unreadable one has none (the report names it)
    thumb = Image.open(made["cutout.png"])
    assert thumb.size == (256, 512) and np.asarray(thumb).min() >= 250  # 512 px the long side, on white

    Image.new("RGB", (64, 64), BLUE).save(tmp_path / "cutout.png")  # the image changes: a new thumbnail
    remade = thumbnails([tmp_path / "cutout.png"], cache)
    assert remade["cutout.png"] != made["cutout.png"] and not made["cutout.png"].exists()
    assert np.asarray(Image.open(remade["cutout.png"]))[..., 2].min() > 240
