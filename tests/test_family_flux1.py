"""Flux.1's header and alpha as the ecosystems expect them: a schnell base is `flux-1-schnell/lora` (kohya), and
`lora_alpha` left out follows the rank as --help says, on Flux.1 as on every family."""

import pytest
from diffusers import FluxPipeline
from safetensors import safe_open

from studio.config import config_from_dict, field_help
from studio.demo.flux import tiny_flux_transformer
from studio.families import all_families
from studio.hardware import detect
from studio.loop import train
from studio.plan.fit import fit_config
from studio.tasks import IMAGE_TASK
from tests.test_image_training import solid_colours


def _header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def schnell(demo, tmp_path_factory):
    """The tiny Flux pipeline with a transformer without guidance embedder: schnell's layout."""
    out = tmp_path_factory.mktemp("schnell") / "tiny-schnell"
    pipe = FluxPipeline.from_pretrained(str(demo.flux), transformer=tiny_flux_transformer(guidance=False))
    pipe.save_pretrained(out)
    return out


@pytest.mark.parametrize("which, architecture", [("dev", "flux-1-dev/lora"), ("schnell", "flux-1-schnell/lora")])
def test_modelspec_architecture_names_dev_and_schnell(demo, schnell, tmp_path, which, architecture):
    model = demo.flux if which == "dev" else schnell
    cfg = config_from_dict({"preset": "demo-flux", "base_model": str(model), "output_dir": str(tmp_path / "run"),
                            "train_data_dir": str(solid_colours(tmp_path / "colours")), "max_train_steps": 1,
                            "sample_every_steps": 0, "sample_prompts": []})
    meta = _header(train(cfg).files[0])
    assert meta["modelspec.architecture"] == architecture
    assert meta["ss_base_model_version"] == "flux1"


@pytest.mark.parametrize("family", [f.name for f in all_families(IMAGE_TASK)])
def test_alpha_left_out_follows_the_rank_on_every_family(family):
    """--help says "Default: lora_rank"; the family's preset values must not put another alpha in. (A hub id that is
    not cached: the plan sizes the family's reference model from its shipped configs.)"""
    assert "Default: lora_rank" in field_help("lora_alpha")
    base = {"base_model": "example/not-downloaded", "model_family": family, "output_dir": "x",
            "train_data_dir": "data", "lora_rank": 4, "resolution": 256}  # small: the plan is traced, not run
    fitted = fit_config(base, detect(), check_paths=False)
    assert fitted.cfg.lora_rank == 4 and fitted.cfg.effective_alpha == 4.0
