"""Single-file checkpoints (A1111 layout): family detection, loading through diffusers' converters, pickle policy."""

import argparse
import json
import struct
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.demo.single_file import pipeline_to_ldm, write_single_file
from studio.models import single_file as sf
from studio.families import get_family
from studio.models import CONFIG_ROOT
from studio.models.single_file import detect_family, load_single_file
from studio.errors import StudioError


@pytest.fixture(scope="module")
def files(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_file")
    return {
        "sd15": write_single_file(demo.sd15, out / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors"),
        "sdxl": write_single_file(demo.sdxl, out / "models" / "Stable-diffusion" / "sd_xl_base.safetensors"),
        "ckpt": write_single_file(demo.sd15, out / "models" / "Stable-diffusion" / "v1-5-pruned.ckpt"),
    }


def _image(pipe, seed=0):
    return pipe("a red circle on a white background", num_inference_steps=3, height=64, width=64,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_generates_the_same_image_as_its_folder(demo, files, family):
    from diffusers import DiffusionPipeline

    folder = getattr(demo, family)
    assert detect_family(files[family]).name == family
    pipe = load_single_file(files[family], config_dir=folder)
    assert type(pipe).__name__ in get_family(family).pipeline_classes
    ref = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is type(ref)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(ref, name):
            _same_weights(getattr(pipe, name), getattr(ref, name))
    a, b = _image(pipe), _image(ref)
    assert a.std() > 0.01
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_detection_uses_the_weights_not_the_file_name(demo, tmp_path):
    # An SDXL file named like an SD1.5 one is still SDXL.
    misleading = write_single_file(demo.sdxl, tmp_path / "v1-5-pruned-emaonly.safetensors")
    assert detect_family(misleading).name == "sdxl"


def test_pickle_is_refused_with_the_reason_and_the_way_out(files):
    for call in (lambda: load_single_file(files["ckpt"]), lambda: detect_family(files["ckpt"])):
        with pytest.raises(StudioError) as e:
            call()
        msg = str(e.value)
        assert "v1-5-pruned.ckpt" in msg and "arbitrary code" in msg
        assert "allow_unsafe_pickle: true" in msg and ".safetensors" in msg


def test_pickle_loads_when_allowed(demo, files, tmp_path):
    pipe = load_single_file(files["ckpt"], allow_unsafe_pickle=True, config_dir=demo.sd15)
    ref = load_single_file(files["sd15"], config_dir=demo.sd15)
    _same_weights(pipe.unet, ref.unet)
    _same_weights(pipe.text_encoder, ref.text_encoder)
    assert detect_family(files["ckpt"], allow_unsafe_pickle=True).name == "sd15"
    # A training checkpoint that pickles more than tensors (e.g. hyper-parameters) needs the full unpickler.
    full = tmp_path / "trained.pt"
    torch.save({"state_dict": pipeline_to_ldm(demo.sd15), "hyper_parameters": argparse.Namespace(lr=1e-4)}, full)
    pipe2 = load_single_file(full, allow_unsafe_pickle=True, config_dir=demo.sd15)
    _same_weights(pipe2.vae, ref.vae)


def _fake(path, names, shape=(4, 4)):
    save_file({n: torch.zeros(*shape) for n in names}, str(path))
    return path


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("names, expected", [
    (["linear.weight", "linear.bias"], "not a checkpoint layout Studio recognises"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "standalone VAE"),
    ([UNET_IN, "cond_stage_model.model.transformer.resblocks.0.ln_1.weight", "first_stage_model.x"], "2.x"),
    ([UNET_IN, "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"], "refiner"),
    ([UNET_IN, "first_stage_model.encoder.conv_in.weight"], "no text encoder"),
    ([UNET_IN, "cond_stage_model.transformer.text_model.final_layer_norm.weight"], "no VAE"),
])
def test_unsupported_layouts_get_a_clear_error(tmp_path, names, expected):
    path = _fake(tmp_path / "model.safetensors", names)
    for call in (lambda: detect_family(path), lambda: load_single_file(path)):
        with pytest.raises(StudioError, match=expected) as e:
            call()
        assert "model.safetensors" in str(e.value)


def test_inpainting_unet_is_named(tmp_path):
    path = tmp_path / "inpaint.safetensors"
    save_file({UNET_IN: torch.zeros(8, 9, 3, 3), "cond_stage_model.transformer.x": torch.zeros(1),
               "first_stage_model.x": torch.zeros(1)}, str(path))
    with pytest.raises(StudioError, match="inpainting model"):
        detect_family(path)


def test_broken_or_missing_files(tmp_path):
    bad = tmp_path / "half-downloaded.safetensors"
    bad.write_bytes(b"<html>404</html>")
    with pytest.raises(StudioError, match="not a readable .safetensors"):
        detect_family(bad)
    with pytest.raises(StudioError, match="not found"):
        load_single_file(tmp_path / "missing.safetensors")
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(StudioError, match="not a checkpoint file"):
        load_single_file(other)


def test_detect_family_reads_only_the_header(files, tmp_path, monkeypatch):
    """A header naming an SD1.5 model plus an 8 GiB tensor, over a sparse file: only the header may be read."""
    raw = files["sd15"].read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    end = max(v["data_offsets"][1] for v in header.values())
    giant = 1 << 33
    header["model.diffusion_model.giant"] = {"dtype": "F32", "shape": [1 << 31], "data_offsets": [end, end + giant]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + end + giant)  # sparse: no disk space, and reading it would take seconds and 8 GiB
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    t = time.perf_counter()
    assert detect_family(path).name == "sd15"
    assert time.perf_counter() - t < 1.0


def test_config_dir_must_fit_the_checkpoint(demo, files):
    with pytest.raises(StudioError, match="config folder .* is for StableDiffusionPipeline"):
        load_single_file(files["sdxl"], config_dir=demo.sd15)
    # The shipped full-size SD1.5 configs do not fit the tiny weights: a clear error, not a traceback.
    with pytest.raises(StudioError, match="do not fit the config in"):
        load_single_file(files["sd15"])


def test_shipped_tokenizers_are_the_real_clip_bpe():
    from transformers import CLIPTokenizer

    ids = [49406, 320, 1125, 539, 320, 2368, 49407]
    for sub, pad, pad_id in [("sd15/tokenizer", "<|endoftext|>", 49407), ("sdxl/tokenizer", "<|endoftext|>", 49407),
                             ("sdxl/tokenizer_2", "!", 0)]:
        tok = CLIPTokenizer.from_pretrained(CONFIG_ROOT / sub)
        assert len(tok) == 49408 and tok.model_max_length == 77
        assert tok("a photo of a cat").input_ids == ids
        assert (tok.pad_token, tok.pad_token_id) == (pad, pad_id)
        padded = tok("a photo of a cat", padding="max_length").input_ids
        assert len(padded) == 77 and padded[7:] == [pad_id] * 70


def _meta_models(family):
    """The full-size components of the shipped configs, on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = CONFIG_ROOT / family
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        }
        if family == "sdxl":
            config_2 = CLIPTextConfig.from_pretrained(root / "text_encoder_2")
            models["text_encoder_2"] = CLIPTextModelWithProjection(config_2)
    return models


def test_shipped_configs_build_the_real_model_sizes():
    """Parameter counts of the published models: SD1.5 UNet 859.5M, VAE 83.7M, CLIP-L 123.1M; SDXL UNet 2.57B,
    OpenCLIP-bigG with projection 694.7M."""
    expected = {"sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
                "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                         "text_encoder_2": 694_659_840}}
    for family, sizes in expected.items():
        models = _meta_models(family)
        assert {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()} == sizes, family
        index = json.loads((CONFIG_ROOT / family / "model_index.json").read_text())
        assert index["_class_name"] in get_family(family).pipeline_classes
        assert set(models) | {"tokenizer", "scheduler"} <= set(index)
    assert get_family("sdxl").config_path == CONFIG_ROOT / "sdxl"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_size_layout_round_trips_through_diffusers_converters(family):
    """The converter at real sizes (4-level SD1.5 UNet, 10-deep SDXL blocks, 32-layer OpenCLIP): its key names and
    shapes are what diffusers' own LDM→diffusers conversion expects, and both detectors agree on the family."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                     infer_diffusers_model_type)

    from studio.demo.single_file import components_to_ldm

    models = _meta_models(family)
    sds = {k: m.state_dict() for k, m in models.items()}
    ldm = components_to_ldm(sds["unet"], dict(models["unet"].config), sds["vae"], dict(models["vae"].config),
                            sds["text_encoder"], sds.get("text_encoder_2"))
    assert sf.family_from_shapes({k: tuple(v.shape) for k, v in ldm.items()}).name == family
    assert infer_diffusers_model_type(ldm) == {"sd15": "v1", "sdxl": "xl_base"}[family]

    def shapes(sd, strip=""):
        return {k.removeprefix(strip): tuple(v.shape) for k, v in sd.items()}

    assert shapes(convert_ldm_unet_checkpoint(ldm, dict(models["unet"].config))) == shapes(sds["unet"])
    assert shapes(convert_ldm_vae_checkpoint(ldm, dict(models["vae"].config))) == shapes(sds["vae"])
    assert shapes(convert_ldm_clip_checkpoint(ldm), "text_model.") == shapes(sds["text_encoder"])
    if family == "sdxl":
        te2 = convert_open_clip_checkpoint(models["text_encoder_2"], ldm, prefix=sf.SDXL_TEXT_2)
        assert shapes(te2) == shapes(sds["text_encoder_2"])


def test_the_planner_reads_a_pickle_base_with_the_opt_in(files):
    """allow_unsafe_pickle reaches every reader of the file: the fit's memory plan too, not only the loader."""
    from studio.hardware import Hardware
    from studio.plan.fit import fit_config

    card = Hardware("cuda", "test card", 24.0, 24.0, True)
    data = {"preset": "style", "base_model": str(files["ckpt"]), "model_family": "sd15", "train_data_dir": "x",
            "output_dir": "y"}
    with pytest.raises(StudioError, match="allow_unsafe_pickle: true"):
        fit_config(data, card, check_paths=False)
    fitted = fit_config({**data, "allow_unsafe_pickle": True}, card, check_paths=False)
    assert "from the file header" in fitted.plan.source and fitted.plan.peak_gb > 0
