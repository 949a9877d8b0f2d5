"""The exported header as kohya sd-scripts writes it, read back the way A1111 and Forge read it."""

import datetime
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.config import config_from_dict
from studio.export.lora_file import save_lora_file
from studio.export.metadata import header_fields
from studio.loop import train
from tests.test_image_training import solid_colours

TRIGGER = "Zkw"
STABILITY, BFL = "https://github.com/Stability-AI/generative-models", "https://github.com/black-forest-labs/flux"
# family → modelspec architecture, implementation, prediction type; A1111's and Forge's verdicts on the file
EXPECTED = {"sd15": ("stable-diffusion-v1/lora", "diffusers", "epsilon", "SD1", "SD1"),
            "sdxl": ("stable-diffusion-xl-v1-base/lora", STABILITY, "epsilon", "SDXL", "SDXL"),
            "flux1": ("flux-1-dev/lora", BFL, None, "SD1", "Flux")}  # A1111 has no Flux: any other file is SD1


def a1111_version(meta: dict) -> str:
    """A1111's NetworkOnDisk.detect_version (extensions-builtin/Lora/network.py)."""
    if meta.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if meta.get("ss_v2", "") == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def forge_version(meta: dict) -> str:
    """Forge's NetworkOnDisk.detect_version (extensions-builtin/sd_forge_lora/network.py)."""
    arch = meta.get("modelspec.architecture", "")
    if meta.get("modelspec.implementation", "") == BFL or arch == "flux-1-dev/lora":
        return "Flux"
    if arch == "stable-diffusion-xl-v1-base/lora" or meta.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if meta.get("ss_v2", "") == "True":
        return "SD2"
    return "SD1" if arch == "stable-diffusion-v1/lora" else "Unknown"


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def data_hash(path) -> str:
    """sha256 of the bytes after the 8-byte length and the JSON header: what A1111 / Forge hash as a LoRA's hash."""
    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    """family → (config, exported file): two steps on the solid colours each."""
    tmp = tmp_path_factory.mktemp("meta")
    data = solid_colours(tmp / "colours")
    runs = {}
    for family, model, preset in (("sd15", demo.sd15, "demo-image"), ("sdxl", demo.sdxl, "demo-image"),
                                  ("flux1", demo.flux, "demo-flux")):
        cfg = config_from_dict({"preset": preset, "base_model": str(model), "train_data_dir": str(data),
                                "output_dir": str(tmp / family), "max_train_steps": 2, "repeats": 3,
                                "trigger_word": TRIGGER, "sample_every_steps": 0, "sample_prompts": []})
        runs[family] = cfg, train(cfg).files[0]
    return runs


@pytest.mark.parametrize("family", EXPECTED)
def test_header_has_kohyas_fields_in_kohyas_formats(exported, family):
    cfg, path = exported[family]
    meta = header(path)
    architecture, implementation, prediction, _, _ = EXPECTED[family]
    assert meta["ss_output_name"] == meta["modelspec.title"] == cfg.name == path.stem == family
    assert meta["ss_sd_model_name"] == Path(cfg.base_model).name
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert started < finished <= time.time()
    assert 0 <= int(meta["ss_session_id"]) < 2**32
    assert json.loads(meta["ss_dataset_dirs"]) == {"colours": {"n_repeats": 3, "img_count": 4}}
    assert meta["ss_num_train_images"] == "12" and meta["ss_shuffle_caption"] == "False"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (architecture, implementation)
    assert meta.get("modelspec.prediction_type") == prediction
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(int(finished)).isoformat()


def test_tag_frequency_counts_the_captions_as_trained(exported):
    """A1111's Lora tab lists these tags: each caption's comma-separated parts, lower-cased, trigger word included."""
    _, path = exported["sd15"]
    tags = {"zkw": 4, "flat colour": 4, **{f"a {c} picture": 1 for c in ("red", "green", "blue", "white")}}
    assert json.loads(header(path)["ss_tag_frequency"]) == {"colours": tags}


@pytest.mark.parametrize("family", EXPECTED)
def test_model_hash_is_the_hash_of_the_files_tensor_data(exported, family):
    meta = header(exported[family][1])
    assert meta["sshs_model_hash"] == data_hash(exported[family][1])
    assert len(meta["sshs_legacy_hash"]) == 8


@pytest.mark.parametrize("family", EXPECTED)
def test_webuis_detect_the_family_from_the_header(exported, family):
    meta = header(exported[family][1])
    assert (a1111_version(meta), forge_version(meta)) == EXPECTED[family][3:]


def test_legacy_hash_is_kohyas_and_ignores_non_training_metadata(tmp_path):
    """kohya hashes the file as serialized with the ss_* fields only, reading 64 KiB at 1 MiB for the legacy hash."""
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(2**19, dtype=torch.float32)}  # 2 MiB: past 1 MiB
    training = {"ss_network_dim": "4", "ss_output_name": "x"}
    save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata=training)
    legacy = hashlib.sha256((tmp_path / "kohya.safetensors").read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    for note in ("short", "a much longer note that moves the tensor data further into the file"):
        path = save_lora_file(tmp_path / "lora.safetensors", tensors, {**training, "studio_note": note})
        meta = header(path)
        assert meta["sshs_legacy_hash"] == legacy and meta["sshs_model_hash"] == data_hash(path)
        assert meta["studio_note"] == note


def test_text_runs_get_the_run_fields_only():
    cfg = config_from_dict({"task_type": "text-generation", "base_model": "org/chat-model", "train_data_dir": "chats",
                            "output_dir": "runs/chat"}, check_paths=False)
    meta = header_fields(cfg, None, steps=5, samples=10, seconds=2.0, finished=1_700_000_000.0)
    assert meta["ss_output_name"] == "chat" and meta["ss_sd_model_name"] == "org/chat-model"
    assert meta["ss_training_started_at"] == "1699999998.0" and meta["ss_training_finished_at"] == "1700000000.0"
    assert not any(k.startswith("modelspec.") or k in ("ss_resolution", "ss_tag_frequency") for k in meta)
