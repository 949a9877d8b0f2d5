"""Image preview: base model + several adapters mixed by strength, and the strength sweep grid."""

import numpy as np
import pytest

from studio.config import config_from_dict
from studio.errors import StudioError
from studio.loop import train
from studio.preview.images import SWEEP_STRENGTHS, ImagePreviewer


@pytest.fixture(scope="module")
def two_adapters(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preview")
    files = []
    for seed in (1, 2):
        cfg = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir":
                                str(demo.images), "output_dir": str(tmp / f"lora{seed}"), "seed": seed,
                                "max_train_steps": 6, "sample_prompts": [], "sample_every_steps": 0})
        files.append(str(train(cfg).files[0]))
    return files


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_strengths_and_mixing(demo, two_adapters):
    preview = ImagePreviewer()
    a, b = two_adapters
    kwargs = dict(prompt="a red circle", seed=3, steps=4, width=64, height=64)
    base = pixels(preview.generate(str(demo.sd15), [], **kwargs))
    off = pixels(preview.generate(str(demo.sd15), [(a, 0.0)], **kwargs))
    full = pixels(preview.generate(str(demo.sd15), [(a, 1.0)], **kwargs))
    weak = pixels(preview.generate(str(demo.sd15), [(a, 0.3)], **kwargs))
    mixed = pixels(preview.generate(str(demo.sd15), [(a, 1.0), (b, 1.0)], **kwargs))
    assert (off == base).all()  # strength 0 is the base model
    assert np.abs(full - base).max() > 0 and np.abs(weak - full).max() > 0
    assert np.abs(mixed - full).max() > 0  # the second adapter adds its own change
    again = pixels(preview.generate(str(demo.sd15), [(a, 1.0)], **kwargs))
    assert (again == full).all()  # b is switched off again, and the seed reproduces the image


def test_strength_sweep_grid(demo, two_adapters):
    grid, layout = ImagePreviewer().strength_sweep(str(demo.sd15), [("final", two_adapters[0])], "a red circle",
                                                   seed=0, steps=2, width=64, height=64)
    assert layout.strengths == SWEEP_STRENGTHS and layout.rows == ("final",) and grid.size == layout.size
    tiles = [pixels(grid.crop(layout.tile_box(0, c))) for c in range(len(SWEEP_STRENGTHS))]
    assert np.abs(tiles[0] - tiles[-1]).max() > 0


def test_missing_adapter_is_a_clear_error(demo):
    with pytest.raises(StudioError, match="does not exist"):
        ImagePreviewer().generate(str(demo.sd15), [("/nope.safetensors", 1.0)], "x", steps=1, width=64, height=64)


def test_sd15_lora_on_sdxl_says_which_family_it_is_for(demo, two_adapters):
    """SD1.5 and SDXL LoRAs share key names; the header tells them apart, before torch's size-mismatch list."""
    with pytest.raises(StudioError) as err:
        ImagePreviewer().generate(str(demo.sdxl), [(two_adapters[0], 1.0)], "x", steps=1, width=64, height=64)
    assert str(err.value).startswith("lora1.safetensors is a LoRA for SD1.5, but the base model is SDXL.")
    assert "size mismatch" not in str(err.value) and "\n" not in str(err.value)
