"""The demo visibly learns: the pretrained tiny SD1.5 draws the colour and shape asked for, and the demo preset's
LoRA, trained on the demo dataset, turns its shapes into the colour that dataset teaches.

Measured on real pipeline output; a random-weight model draws coloured noise and fails every assertion here."""

import numpy as np
import pytest

from studio.config import config_from_dict
from studio.demo.datasets import BACKGROUND, COLOURS, PALETTE, TAUGHT_COLOUR, caption
from studio.loop import train
from studio.preview.images import ImagePreviewer

SEEDS = (0, 1, 2)


def regions(image) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB of the centre 16×16 and of the 6-pixel frame of a 64 px image."""
    pixels = np.asarray(image, dtype=float)
    centre = pixels[24:40, 24:40].reshape(-1, 3).mean(axis=0)
    frame = np.concatenate([pixels[:6], pixels[-6:], pixels[:, :6].transpose(1, 0, 2), pixels[:, -6:].transpose(1, 0, 2)])
    return centre, frame.reshape(-1, 3).mean(axis=0)


def distance(rgb: np.ndarray, target: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(rgb - np.array(target)))


def nearest(rgb: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda name: distance(rgb, palette[name]))


def coverage(image, colour: str) -> float:
    """The share of pixels nearer `colour` than the background."""
    pixels = np.asarray(image, dtype=float)
    to_colour = np.linalg.norm(pixels - np.array(PALETTE[colour]), axis=-1)
    return float((to_colour < np.linalg.norm(pixels - np.array(BACKGROUND), axis=-1)).mean())


@pytest.fixture(scope="module")
def previewer():
    return ImagePreviewer()


@pytest.mark.parametrize("colour, shape", [("red", "circle"), ("blue", "square"), ("yellow", "triangle")])
def test_base_draws_the_colour_asked_for_on_a_white_background(demo, previewer, colour, shape):
    for seed in SEEDS:
        image = previewer.generate(str(demo.sd15), [], caption(colour, shape), seed=seed, width=64, height=64)
        centre, frame = regions(image)
        assert nearest(centre, COLOURS) == colour and distance(centre, COLOURS[colour]) < 60, (seed, centre)
        assert distance(frame, BACKGROUND) < 30, (seed, frame)


def test_base_draws_the_shape_asked_for(demo, previewer):
    """A square fills more of the image than a circle of the same size, and a circle more than a triangle."""
    areas = {shape: np.mean([coverage(previewer.generate(str(demo.sd15), [], caption("green", shape), seed=seed,
                                                         width=64, height=64), "green") for seed in SEEDS])
             for shape in ("square", "circle", "triangle")}
    assert areas["square"] > areas["circle"] > areas["triangle"] > 0.05, areas


def test_demo_lora_teaches_its_colour(demo, previewer, tmp_path):
    cfg = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                            "output_dir": str(tmp_path / "run")})
    lora = str(train(cfg).files[0])
    prompt = cfg.sample_prompts[0]
    assert TAUGHT_COLOUR in prompt
    target = PALETTE[TAUGHT_COLOUR]
    for seed in SEEDS:
        off, _ = regions(previewer.generate(str(demo.sd15), [(lora, 0.0)], prompt, seed=seed, width=64, height=64))
        on, frame = regions(previewer.generate(str(demo.sd15), [(lora, 1.0)], prompt, seed=seed, width=64, height=64))
        assert nearest(off, PALETTE) != TAUGHT_COLOUR, (seed, off)  # the base model does not know the colour
        assert nearest(on, PALETTE) == TAUGHT_COLOUR and distance(on, target) < 60, (seed, on)
        assert distance(on, target) < distance(off, target) - 60, (seed, off, on)
        assert distance(frame, BACKGROUND) < 40, (seed, frame)
