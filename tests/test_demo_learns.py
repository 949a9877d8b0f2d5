"""The demo visibly learns: the pretrained tiny SD1.5 draws the colour and shape asked for, and the demo preset's
LoRA, trained on the demo dataset, turns its shapes into the colour that dataset teaches.

Measured on real pipeline output; a random-weight model draws coloured noise and fails every assertion here."""

import numpy as np
import pytest
import torch

from studio.config import config_from_dict
from studio.demo.datasets import BACKGROUND, COLOURS, PALETTE, SHAPES, TAUGHT_COLOUR, caption
from studio.loop import train
from studio.preview.images import ImagePreviewer

SEEDS = (0, 1, 2)


def ink(image) -> np.ndarray:
    """Where the shape is: the pixels far from the background."""
    pixels = np.asarray(image, dtype=float)
    return np.linalg.norm(pixels - np.array(BACKGROUND), axis=-1) > 80


def ink_colour(image) -> np.ndarray:
    return np.asarray(image, dtype=float)[ink(image)].mean(axis=0)


def frame_colour(image) -> np.ndarray:
    """Mean RGB of the 6-pixel frame of a 64 px image."""
    pixels = np.asarray(image, dtype=float)
    sides = [pixels[:6], pixels[-6:], pixels[6:-6, :6], pixels[6:-6, -6:]]
    return np.concatenate([side.reshape(-1, 3) for side in sides]).mean(axis=0)


def fill_of_box(image) -> float:
    """The share of the shape's bounding box it fills: square 1, circle π/4, triangle 1/2."""
    rows, cols = np.nonzero(ink(image))
    return len(rows) / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))


def distance(rgb: np.ndarray, target: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(rgb - np.array(target)))


def nearest(rgb: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda name: distance(rgb, palette[name]))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from a second thread, and lose much when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def previewer():
    return ImagePreviewer()


@pytest.mark.parametrize("colour, shape", [("red", "circle"), ("blue", "square"), ("yellow", "triangle")])
def test_base_draws_the_colour_asked_for_on_a_white_background(demo, previewer, colour, shape):
    for seed in SEEDS:
        image = previewer.generate(str(demo.sd15), [], caption(colour, shape), seed=seed, width=64, height=64)
        assert 0.1 < ink(image).mean() < 0.6, seed  # one shape, not a filled frame or an empty one
        assert nearest(ink_colour(image), COLOURS) == colour, (seed, ink_colour(image))
        assert distance(ink_colour(image), COLOURS[colour]) < 50, (seed, ink_colour(image))
        assert distance(frame_colour(image), BACKGROUND) < 25, (seed, frame_colour(image))


def test_base_draws_the_shape_asked_for(demo, previewer):
    for seed in SEEDS:
        fill = {shape: fill_of_box(previewer.generate(str(demo.sd15), [], caption("green", shape), seed=seed,
                                                      width=64, height=64)) for shape in SHAPES}
        assert fill["square"] > 0.82 and 0.64 < fill["circle"] < 0.8 and 0.4 < fill["triangle"] < 0.64, (seed, fill)


def test_demo_lora_teaches_its_colour(demo, previewer, tmp_path):
    cfg = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                            "output_dir": str(tmp_path / "run")})
    lora = str(train(cfg).files[0])
    prompt = cfg.sample_prompts[0]
    assert TAUGHT_COLOUR in prompt
    target = PALETTE[TAUGHT_COLOUR]
    for seed in SEEDS:
        off = previewer.generate(str(demo.sd15), [(lora, 0.0)], prompt, seed=seed, width=64, height=64)
        on = previewer.generate(str(demo.sd15), [(lora, 1.0)], prompt, seed=seed, width=64, height=64)
        assert nearest(ink_colour(off), PALETTE) != TAUGHT_COLOUR, (seed, ink_colour(off))  # the base cannot draw it
        assert nearest(ink_colour(on), PALETTE) == TAUGHT_COLOUR, (seed, ink_colour(on))
        assert distance(ink_colour(on), target) < distance(ink_colour(off), target) - 80, seed
        assert 0.1 < ink(on).mean() < 0.6 and distance(frame_colour(on), BACKGROUND) < 20, seed  # still one shape
