"""The export self-test: every key of an exported LoRA resolves to a layer of its base model with matching shapes,
and a broken file (a renamed key, a wrong shape) is caught."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from studio.export.selftest import check_lora, check_lora_file
from studio.families import get_family
from studio.loop import train
from tests.test_flux_training import flux_config
from tests.test_image_training import image_config, solid_colours


@pytest.fixture(scope="module")
def sd15_export(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selftest")
    result = train(image_config(demo.sd15, solid_colours(tmp / "data"), tmp / "run", max_train_steps=1,
                                train_text_encoder=True))
    return result.files[0]


def test_exported_file_passes_and_says_so_in_its_header(demo, sd15_export):
    with safe_open(str(sd15_export), "pt") as f:
        keys, meta = len(list(f.keys())), f.metadata()
    assert meta["studio_selftest"] == f"all {keys} keys load in A1111 / Forge / ComfyUI / diffusers"
    test = check_lora_file(sd15_export, StableDiffusionPipeline.from_pretrained(demo.sd15), get_family("sd15"))
    assert test.ok and test.keys == keys


def test_renamed_key_and_wrong_shape_are_caught(demo, sd15_export):
    tensors = load_file(str(sd15_export))
    down = next(k for k in tensors if k.startswith("lora_unet_") and k.endswith("attn1_to_q.lora_down.weight"))
    te_up = next(k for k in tensors if k.startswith("lora_te_") and k.endswith(".lora_up.weight"))
    broken = dict(tensors)
    broken[down.replace("attn1", "attn9")] = broken.pop(down)  # a renamed key: no such layer
    broken[te_up] = torch.zeros(broken[te_up].shape[0] + 1, broken[te_up].shape[1])  # one output too many
    test = check_lora(broken, StableDiffusionPipeline.from_pretrained(demo.sd15), get_family("sd15"))
    assert not test.ok
    module = down.removesuffix(".lora_down.weight").replace("attn1", "attn9")
    assert any(p.startswith(f"{module}.lora_down.weight: no layer {module}") for p in test.problems)
    assert any("has only one of its two LoRA matrices" in p for p in test.problems)  # `up` lost its partner
    assert any(te_up.removesuffix(".lora_up.weight") in p and "outputs" in p for p in test.problems)
    assert test.summary().startswith(f"{len(test.problems)} problem(s) among {len(broken)} keys")


def test_original_layout_names_resolve_on_sdxl(demo):
    """kohya's SDXL files name UNet layers after the original layout (lora_unet_input_blocks_4_1_…): resolved through
    diffusers' own single-file conversion, with shapes checked."""
    pipe = StableDiffusionXLPipeline.from_pretrained(demo.sdxl)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    name = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # full size: input_blocks_4 (2 layers/block)
    good = {f"{name}.lora_down.weight": torch.zeros(4, layer.in_features),
            f"{name}.lora_up.weight": torch.zeros(layer.out_features, 4), f"{name}.alpha": torch.tensor(4.0)}
    assert check_lora(good, pipe, get_family("sdxl")).ok
    wrong = {**good, f"{name}.lora_down.weight": torch.zeros(4, layer.in_features * 2)}
    assert "down matrix takes" in check_lora(wrong, pipe, get_family("sdxl")).summary()


def test_flux_export_passes(demo, tmp_path):
    result = train(flux_config(demo.flux, solid_colours(tmp_path / "data"), tmp_path / "run", max_train_steps=1))
    with safe_open(str(result.files[0]), "pt") as f:
        assert f.metadata()["studio_selftest"].endswith("keys load in Forge / ComfyUI / diffusers")
    tensors = load_file(str(result.files[0]))
    tensors["transformer.not_a_block.lora_A.weight"] = torch.zeros(1, 1)
    assert not check_lora(tensors, FluxPipeline.from_pretrained(demo.flux), get_family("flux1")).ok


@pytest.mark.parametrize("network_type", ["loha", "lokr"])
def test_lycoris_factor_shapes_are_checked(demo, tmp_path, network_type):
    result = train(image_config(demo.sd15, solid_colours(tmp_path / "data"), tmp_path / "run", max_train_steps=1,
                                network_type=network_type))
    tensors = load_file(str(result.files[0]))
    pipe, family = StableDiffusionPipeline.from_pretrained(demo.sd15), get_family("sd15")
    assert check_lora(tensors, pipe, family).ok
    key = next(k for k in tensors if k.endswith((".hada_w1_a", ".lokr_w2")))
    tensors[key] = torch.zeros(tensors[key].shape[0] * 2, *tensors[key].shape[1:])
    assert "its factors build a" in check_lora(tensors, pipe, family).summary()
