"""Chroma on a tiny random ChromaPipeline (real class and names, blocks shrunk): recognised from a folder, a hub id and
its single files; planned at full size from the shipped configs; trained, exported, reloaded into diffusers."""

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from studio.errors import StudioError
from studio.families import detect_family, get_family
from studio.models import CONFIG_ROOT
from tests.family_checks import (add_tensor, assert_lora_reloads, assert_resume_matches_uninterrupted_run,
                                 assert_single_file_loads, comfy_name, fit_at_full_size, train_and_read_export)

CHROMA = get_family("chroma")  # the registry first: it keeps the families in FAMILY_MODULES order

from studio.demo.chroma import build_tiny_chroma, chroma_file_layout, write_chroma_checkpoint  # noqa: E402
from studio.families.chroma import to_diffusers  # noqa: E402
from studio.models.pipelines import load_pipeline  # noqa: E402

COMFY = "model.diffusion_model."
# The diffusers-side names ComfyUI's Flux key map (comfy/utils.py flux_to_diffusers, which comfy/lora.py uses for its
# Chroma model class, a Flux subclass) resolves onto its fused layers, for the layers a LoRA adapts.
COMFY_FLUX_NAMES = {
    *(f"transformer_blocks.0.{name}" for name in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2")),
    *(f"single_transformer_blocks.0.{name}" for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp",
                                                         "proj_out")),
    "proj_out"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_chroma(tmp_path_factory.mktemp("chroma") / "tiny-chroma")


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red picture", num_inference_steps=2, height=64, width=64, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_recognised_from_folder_and_hub_id(tiny):
    assert detect_family("image-generation", str(tiny)) is CHROMA
    assert detect_family("image-generation", "lodestones/Chroma1-HD") is CHROMA


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_single_file_loads_with_components_folder(tiny, tmp_path, prefix):
    """Chroma's own file layout (BFL names, pruned modulations), bare or as ComfyUI saves it."""
    path = write_chroma_checkpoint(tiny, tmp_path / "chroma1-hd.safetensors", prefix)
    assert_single_file_loads(tiny, path, CHROMA, ChromaPipeline)


def test_single_file_without_components_says_how_to_get_them(tiny, tmp_path):
    path = write_chroma_checkpoint(tiny, tmp_path / "chroma.safetensors")
    with pytest.raises(StudioError, match="base_components .*hf download lodestones/Chroma1-HD"):
        load_pipeline(str(path), components=str(tmp_path / "nowhere"))


def test_radiance_is_refused_with_what_it_is(tiny, tmp_path):
    path = write_chroma_checkpoint(tiny, tmp_path / "radiance.safetensors")
    add_tensor(path, "nerf_image_embedder.embedder.0.weight")
    with pytest.raises(StudioError, match="Chroma Radiance, a pixel-space model"):
        load_pipeline(str(path), components=str(tiny))


def test_file_layout_matches_diffusers_converter_at_full_width():
    """At Chroma's real width (3072, which diffusers' converter assumes) both conversions agree, on meta tensors."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    config = {**ChromaTransformer2DModel.load_config(CONFIG_ROOT / "chroma" / "transformer"), "num_layers": 1,
              "num_single_layers": 2, "approximator_layers": 2}
    with torch.device("meta"):
        model = ChromaTransformer2DModel.from_config(config)
    wanted = {k: v.shape for k, v in model.state_dict().items()}
    ours = to_diffusers(chroma_file_layout(model.state_dict()))
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(chroma_file_layout(model.state_dict(), COMFY))
    assert {k: v.shape for k, v in ours.items()} == wanted == {k: v.shape for k, v in theirs.items()}


def test_shipped_configs_are_chroma1_hd():
    index = (CONFIG_ROOT / "chroma" / "model_index.json").read_text()
    assert '"ChromaPipeline"' in index and '"ChromaTransformer2DModel"' in index
    with torch.device("meta"):
        model = ChromaTransformer2DModel.from_config(ChromaTransformer2DModel.load_config(CONFIG_ROOT / "chroma",
                                                                                          subfolder="transformer"))
    assert sum(p.numel() for p in model.parameters()) == 8_899_983_424  # Chroma1-HD's "8.9 B"


@pytest.mark.slow  # traces the 8.9 B transformer at 1024 px on the meta device
def test_planned_at_full_size_on_the_usual_cards():
    fits = fit_at_full_size("Chroma", (24, 12, 8))
    assert all(fitted.cfg.effective_alpha == fitted.cfg.lora_rank for fitted in fits)
    assert fits[-1].cfg.load_in_4bit  # 8 GB


def test_trains_two_steps_and_exports_what_comfyui_and_diffusers_load(tiny, tmp_path, caplog):
    result, meta, tensors = train_and_read_export(tiny, tmp_path)  # sampled from the pre-encoded prompt
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("chroma/lora", "chroma")
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert meta["studio_selftest"].startswith("all 36 keys load")  # 18 modules: the blocks' Linears + proj_out
    assert all(k.startswith("transformer.") and ".lora_" in k for k in tensors)
    assert {comfy_name(k) for k in tensors} <= COMFY_FLUX_NAMES  # no "lora key not loaded" in ComfyUI
    assert_lora_reloads(ChromaPipeline.from_pretrained(tiny), render, result.files[0], caplog)


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    assert_resume_matches_uninterrupted_run(tiny, tmp_path)
