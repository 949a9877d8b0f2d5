"""Qwen-Image on a tiny random QwenImagePipeline (real classes and names, blocks shrunk, a 2-layer Qwen2.5-VL and a
toy-width Wan-style VAE): recognised from a folder, a hub id and its single files; planned at full size from the
shipped configs; trained, exported, reloaded into diffusers."""

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from studio.errors import StudioError
from studio.families import detect_family, get_family
from studio.models import CONFIG_ROOT
from tests.family_checks import (assert_lora_reloads, assert_resume_matches_uninterrupted_run, assert_single_file_loads,
                                 fit_at_full_size, train_and_read_export)

QWEN_IMAGE = get_family("qwen_image")  # the registry first: it keeps the families in FAMILY_MODULES order

from studio.demo.qwen_image import build_tiny_qwen_image, write_qwen_image_checkpoint  # noqa: E402
from studio.models.pipelines import load_pipeline  # noqa: E402

COMFY = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "tiny-qwen-image")


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red picture", negative_prompt=" ", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_recognised_from_folder_and_hub_id(tiny):
    assert detect_family("image-generation", str(tiny)) is QWEN_IMAGE
    assert detect_family("image-generation", "Qwen/Qwen-Image") is QWEN_IMAGE


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_single_file_loads_with_components_folder(tiny, tmp_path, prefix):
    path = write_qwen_image_checkpoint(tiny, tmp_path / "qwen_image_bf16.safetensors", prefix)
    assert_single_file_loads(tiny, path, QWEN_IMAGE, QwenImagePipeline)


def test_edit_model_is_refused_by_name(tiny, tmp_path):
    path = write_qwen_image_checkpoint(tiny, tmp_path / "qwen_image_edit_2509_bf16.safetensors")
    with pytest.raises(StudioError, match="Qwen-Image-Edit"):
        load_pipeline(str(path), components=str(tiny))


def test_shipped_configs_are_qwen_image():
    import json

    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration as VL

    folder = CONFIG_ROOT / "qwen-image"
    with torch.device("meta"):
        model = QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(folder / "transformer"))
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(folder / "vae"))
        text = VL(VL.config_class.from_dict(json.loads((folder / "text_encoder" / "config.json").read_text())))

    def count(m):
        return sum(p.numel() for p in m.parameters())
    # the published 20 B transformer, its VAE, Qwen2.5-VL-7B (with its vision tower)
    assert (count(model), count(vae), count(text)) == (20_430_401_088, 126_892_531, 8_292_166_656)


@pytest.mark.slow  # traces the 20 B transformer at 1024 px on the meta device
def test_planned_at_full_size_on_the_usual_cards():
    """musubi-tuner: 1024 px needs 24 GB with 16 of 60 blocks swapped, 12 GB with 45; the fit gets there too."""
    fit_at_full_size("Qwen-Image", (24, 16, 12))


def test_trains_two_steps_and_exports_what_comfyui_and_diffusers_load(tiny, tmp_path, caplog):
    result, meta, tensors = train_and_read_export(tiny, tmp_path)  # sampled with true CFG, prompt and negative
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("Qwen-Image/lora", "qwen_image")
    assert meta["studio_selftest"].startswith("all 48 keys load")  # 2 blocks × 12 attention / MLP Linears
    assert all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in tensors)
    assert not any("_mod." in k for k in tensors)  # the modulation stays untouched, as in musubi-tuner
    assert_lora_reloads(QwenImagePipeline.from_pretrained(tiny), render, result.files[0], caplog, min_change=1e-4)


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    assert_resume_matches_uninterrupted_run(tiny, tmp_path)
