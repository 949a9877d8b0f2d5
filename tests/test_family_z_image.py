"""Z-Image on a tiny random ZImagePipeline (real classes and names, layers shrunk, a 2-layer Qwen3 encoder):
recognised from a folder, a hub id and its single files; planned at full size from the shipped configs; trained,
exported, reloaded into diffusers; sampled at Turbo's and the base model's defaults."""

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from studio.errors import StudioError
from studio.families import detect_family, get_family
from studio.models import CONFIG_ROOT
from tests.family_checks import (add_tensor, assert_lora_reloads, assert_resume_matches_uninterrupted_run,
                                 assert_single_file_loads, comfy_name, fit_at_full_size, train_and_read_export)

Z_IMAGE = get_family("z_image")  # the registry first: it keeps the families in FAMILY_MODULES order

from studio.demo.z_image import build_tiny_z_image, write_z_image_checkpoint, z_image_file_layout  # noqa: E402
from studio.families.z_image import to_diffusers  # noqa: E402
from studio.models.pipelines import load_pipeline  # noqa: E402

COMFY = "model.diffusion_model."
# The diffusers-side names ComfyUI's Lumina2 / Z-Image key map (comfy/utils.py z_image_to_diffusers, used by
# comfy/lora.py under a `transformer.` prefix) resolves, for the Linears of each block of the tiny model.
COMFY_Z_IMAGE_NAMES = {f"{block}.0.{layer}" for block in ("layers", "context_refiner", "noise_refiner")
                       for layer in ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Named like the base model (not Turbo): samples take its guided defaults."""
    return build_tiny_z_image(tmp_path_factory.mktemp("z") / "tiny-z-image")


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red picture", num_inference_steps=2, height=64, width=64, guidance_scale=0.0,
                max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_recognised_from_folder_and_hub_ids(tiny):
    assert detect_family("image-generation", str(tiny)) is Z_IMAGE
    for hub_id in ("Tongyi-MAI/Z-Image-Turbo", "someone/zimage-finetune"):
        assert detect_family("image-generation", hub_id) is Z_IMAGE


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_single_file_loads_with_components_folder(tiny, tmp_path, prefix):
    """ComfyUI's layout (fused qkv, x_embedder, final_layer), bare or as ComfyUI saves a checkpoint."""
    path = write_z_image_checkpoint(tiny, tmp_path / "z_image_turbo_bf16.safetensors", prefix)
    assert_single_file_loads(tiny, path, Z_IMAGE, ZImagePipeline)


def test_image_conditioned_variants_are_refused(tiny, tmp_path):
    path = add_tensor(write_z_image_checkpoint(tiny, tmp_path / "omni.safetensors"), "siglip_embedder.0.weight")
    with pytest.raises(StudioError, match="Z-Image Omni / ControlNet"):
        load_pipeline(str(path), components=str(tiny))


def test_file_layout_round_trips_at_full_width():
    config = {**ZImageTransformer2DModel.load_config(CONFIG_ROOT / "z-image-turbo" / "transformer"), "n_layers": 1,
              "n_refiner_layers": 1}
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    wanted = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in to_diffusers(z_image_file_layout(model.state_dict())).items()} == wanted


def test_shipped_configs_are_z_image_turbo():
    from transformers import Qwen3Config, Qwen3Model

    folder = CONFIG_ROOT / "z-image-turbo"
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(folder / "transformer"))
        qwen3 = Qwen3Model(Qwen3Config.from_pretrained(folder / "text_encoder"))
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736  # the published "6 B"
    assert sum(p.numel() for p in qwen3.parameters()) == 4_022_468_096  # Qwen3-4B without its (tied) LM head


def test_sampling_defaults_tell_turbo_from_base(tiny):
    pipe = ZImagePipeline.from_pretrained(tiny)
    recipe = Z_IMAGE.load_recipe()
    assert (recipe.sampling(pipe)["num_inference_steps"], recipe.sampling(pipe)["guidance_scale"]) == (28, 4.0)
    pipe.register_to_config(_name_or_path="Tongyi-MAI/Z-Image-Turbo")
    assert (recipe.sampling(pipe)["num_inference_steps"], recipe.sampling(pipe)["guidance_scale"]) == (9, 0.0)


@pytest.mark.slow  # traces the 6 B transformer at 1024 px on the meta device
def test_planned_at_full_size_on_the_usual_cards():
    fits = fit_at_full_size("Z-Image", (24, 12, 8))
    assert all(fitted.cfg.effective_alpha == fitted.cfg.lora_rank for fitted in fits)


def test_trains_two_steps_and_exports_what_comfyui_and_diffusers_load(tiny, tmp_path, caplog):
    result, meta, tensors = train_and_read_export(tiny, tmp_path)  # sampled: guided, from pre-encoded prompt lists
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("Z-Image/lora", "z_image")
    # 3 blocks (main, context and noise refiner) × attention q/k/v/out + feed-forward w1/w2/w3
    assert meta["studio_selftest"].startswith("all 42 keys load")
    assert all(k.startswith("transformer.") and ".lora_" in k for k in tensors)
    assert {comfy_name(k) for k in tensors} <= COMFY_Z_IMAGE_NAMES  # no "lora key not loaded" in ComfyUI
    assert_lora_reloads(ZImagePipeline.from_pretrained(tiny), render, result.files[0], caplog)


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    assert_resume_matches_uninterrupted_run(tiny, tmp_path)
