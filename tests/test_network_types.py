"""LoCon / LoHa / LoKr / DoRA: trained through peft, exported in the LyCORIS layout that A1111, Forge and ComfyUI
load natively, and checked by loading the file with lycoris-lora (the reference implementation those loaders'
LyCORIS support follows): the UNet it rebuilds equals the one peft trained."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from studio.adapters import Scaling, adapter_config
from studio.config import config_from_dict
from studio.errors import StudioError
from studio.export.kohya import to_kohya
from studio.families.sd15 import UNetRecipe
from studio.loop import train
from tests.test_image_training import image_config, solid_colours

CASES = {"locon": {"conv_rank": 2, "conv_alpha": 1.0}, "loha": {}, "lokr": {}, "lokr-factor": {"lokr_factor": 4},
         "dora": {}, "lora-rslora": {"use_rslora": True}}


def unet_output(unet):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text).sample


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_layout_rebuilds_the_trained_unet(demo, case, monkeypatch):
    network_type = case.split("-")[0]
    cfg = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": "x",
                            "output_dir": "y", "network_type": network_type, "lora_rank": 4, "lora_alpha": 2,
                            **CASES[case]}, check_paths=False)
    trained = UNet2DConditionModel.from_pretrained(demo.sd15, subfolder="unet")
    trained.add_adapter(adapter_config(cfg, list(UNetRecipe.targets), UNetRecipe.conv_targets))
    torch.manual_seed(1)
    for name, param in trained.named_parameters():
        if param.requires_grad:  # as if trained: every factor non-zero, magnitudes off their initial norms
            param.data = param.data + 0.2 * torch.randn_like(param)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(trained).items()}
    exported = to_kohya(state, Scaling.of(cfg))
    if network_type == "locon":
        assert any(v.dim() == 4 for k, v in exported.items() if k.endswith(".lora_down.weight"))

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")  # kohya's UNet prefix instead of "lycoris"
    base = UNet2DConditionModel.from_pretrained(demo.sd15, subfolder="unet")
    before = unet_output(base)
    network, _ = create_lycoris_from_weights(1.0, None, base, weights_sd=exported)
    assert len(network.loras) == len({k.split(".")[0] for k in exported})  # every module understood
    network.apply_to()
    rebuilt, expected = unet_output(base), unet_output(trained)
    assert (expected - before).abs().max() > 1e-3  # the adapter matters...
    assert torch.allclose(rebuilt, expected, atol=1e-4, rtol=1e-4), (rebuilt - expected).abs().max()  # ...and is kept


def test_loha_run_exports_a_lycoris_file_that_passes_the_self_test(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    result = train(image_config(demo.sd15, data, tmp_path / "loha", max_train_steps=2, network_type="loha"))
    with safe_open(str(result.files[0]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.endswith(".hada_w1_a") for k in keys) and not any("lora_down" in k for k in keys)
    assert meta["studio_selftest"].startswith("all ") and meta["ss_network_module"] == "lycoris.kohya"
    assert '"algo": "loha"' in meta["ss_network_args"]


def test_unsupported_network_settings_get_one_message(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    with pytest.raises(StudioError, match="network_type loha is not available for Flux.1 models"):
        train(config_from_dict({"preset": "demo-flux", "base_model": str(demo.flux), "train_data_dir": str(data),
                                "output_dir": str(tmp_path / "f"), "network_type": "loha"}))
    with pytest.raises(StudioError, match="use_rslora applies to lora, locon and dora"):
        train(image_config(demo.sd15, data, tmp_path / "r", network_type="lokr", use_rslora=True))


@pytest.mark.parametrize("network_type", ["loha", "dora"])
def test_preview_applies_lycoris_files_by_strength(demo, tmp_path, network_type):
    from studio.preview.images import ImagePreviewer

    data = solid_colours(tmp_path / "colours")
    result = train(image_config(demo.sd15, data, tmp_path / network_type, max_train_steps=3, learning_rate=0.05,
                                network_type=network_type))
    previewer = ImagePreviewer(torch.device("cpu"))
    args = dict(prompt="a red picture", seed=0, steps=2)
    base = np.asarray(previewer.generate(str(demo.sd15), [], **args), dtype=float)
    off = np.asarray(previewer.generate(str(demo.sd15), [(str(result.files[0]), 0.0)], **args), dtype=float)
    on = np.asarray(previewer.generate(str(demo.sd15), [(str(result.files[0]), 1.0)], **args), dtype=float)
    assert np.abs(off - base).max() <= 1  # strength 0: the base model (up to 8-bit rounding)
    assert np.abs(on - base).max() > 2


def test_llm_dora_with_rslora_trains_and_loads_in_peft(demo, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_llm_training import llm_config

    result = train(llm_config(demo, tmp_path / "dora", max_train_steps=2, network_type="dora", use_rslora=True))
    adapter = result.files[0]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.llama), str(adapter))
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    with pytest.raises(StudioError, match="network_type loha is not available for .* \\(use lora or dora\\)"):
        train(llm_config(demo, tmp_path / "loha", network_type="loha"))
