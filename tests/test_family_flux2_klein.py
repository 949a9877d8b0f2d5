"""FLUX.2 [klein] on a tiny random Flux2KleinPipeline (real classes and names, blocks shrunk, a 28-layer 8-wide
Qwen3, the FLUX.2 VAE with batch-norm statistics): recognised from a folder, hub ids and its single files; planned at
full size from the shipped configs; trained, exported, reloaded into diffusers."""

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

from studio.errors import StudioError
from studio.families import detect_family, get_family
from studio.models import CONFIG_ROOT
from tests.family_checks import (add_tensor, assert_lora_reloads, assert_resume_matches_uninterrupted_run,
                                 assert_single_file_loads, comfy_name, fit_at_full_size, train_and_read_export)

KLEIN = get_family("flux2_klein")  # the registry first: it keeps the families in FAMILY_MODULES order

from studio.demo.flux2_klein import build_tiny_flux2_klein, flux2_file_layout, write_flux2_checkpoint  # noqa: E402
from studio.families.flux2_klein import to_diffusers  # noqa: E402
from studio.models.pipelines import load_pipeline  # noqa: E402

COMFY = "model.diffusion_model."
# The diffusers-side names ComfyUI's Flux key map (comfy/utils.py flux_to_diffusers; its Flux2 model class derives
# from Flux) resolves for the Linears a LoRA adapts, in block 0 of each kind.
COMFY_FLUX2_NAMES = {
    *(f"transformer_blocks.0.{name}" for name in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_out.0", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out")),
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "tiny-flux2-klein-base")


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red picture", num_inference_steps=2, height=64, width=64, guidance_scale=4.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_recognised_from_folder_and_hub_ids(tiny):
    assert detect_family("image-generation", str(tiny)) is KLEIN
    assert detect_family("image-generation", "black-forest-labs/FLUX.2-klein-9B") is KLEIN
    assert detect_family("image-generation", "black-forest-labs/FLUX.1-dev").name == "flux1"  # "flux" is less specific


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_single_file_loads_with_components_folder(tiny, tmp_path, prefix):
    path = write_flux2_checkpoint(tiny, tmp_path / "flux-2-klein-base-4b.safetensors", prefix)
    assert_single_file_loads(tiny, path, KLEIN, Flux2KleinPipeline)


def test_flux2_dev_is_refused_with_what_it_is(tiny, tmp_path):
    path = add_tensor(write_flux2_checkpoint(tiny, tmp_path / "flux2-dev.safetensors"), "guidance_in.in_layer.weight")
    with pytest.raises(StudioError, match=r"FLUX.2 \[dev\]"):
        load_pipeline(str(path), components=str(tiny))


@pytest.mark.parametrize("size, text_width, params", [("4b", 7680, 3_875_544_576), ("9b", 12288, None)])
def test_shipped_config_and_file_layout_at_full_width(size, text_width, params):
    """4 B is the shipped config (the published 3.9 B transformer); 9 B differs in blocks, heads and text width, which
    a 9 B file's shapes give (config_overrides); both round-trip through the BFL file layout."""
    from studio.families.flux2_klein import config_overrides

    config = Flux2Transformer2DModel.load_config(CONFIG_ROOT / "flux2-klein-4b" / "transformer")
    if size == "9b":
        config = {**config, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                  "joint_attention_dim": text_width}
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    if params:
        assert sum(p.numel() for p in model.parameters()) == params
    layout = flux2_file_layout(model.state_dict())
    overrides = config_overrides({k: tuple(v.shape) for k, v in layout.items()})
    assert all(config[k] == v for k, v in overrides.items()), overrides
    assert {k: v.shape for k, v in to_diffusers(layout).items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.slow  # traces the 3.9 B transformer at 1024 px on the meta device
def test_planned_at_full_size_on_the_usual_cards():
    fit_at_full_size("FLUX.2 klein", (24, 12, 8))


def test_trains_two_steps_and_exports_what_comfyui_and_diffusers_load(tiny, tmp_path, caplog):
    result, meta, tensors = train_and_read_export(tiny, tmp_path)  # the base model's guided sample, pre-encoded
    assert meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert meta["studio_selftest"].startswith("all 26 keys load")  # 12 double-block Linears + the fused single one
    assert {comfy_name(k) for k in tensors} <= COMFY_FLUX2_NAMES
    assert_lora_reloads(Flux2KleinPipeline.from_pretrained(tiny), render, result.files[0], caplog)


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    assert_resume_matches_uninterrupted_run(tiny, tmp_path)
