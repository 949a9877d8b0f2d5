"""Image base-model loading errors: each says what was wrong and what to do."""

import pytest

from studio.models.pipelines import load_pipeline
from studio.errors import StudioError


def test_hub_id_offline_says_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StudioError) as err:
        load_pipeline("someone/not-cached-model")
    assert "hf download someone/not-cached-model" in str(err.value)
    assert "local_files_only" not in str(err.value) and "stacktrace" not in str(err.value)


def test_missing_local_path_is_not_called_a_hub_id(tmp_path):
    with pytest.raises(StudioError) as err:
        load_pipeline(str(tmp_path / "no-such-model"))
    assert str(err.value) == (f"The base model {tmp_path / 'no-such-model'} does not exist. Give a diffusers model "
                              "folder or a .safetensors checkpoint file.")


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(StudioError, match="not a diffusers model \\(no model_index.json\\)"):
        load_pipeline(str(tmp_path))


def test_unsupported_pipeline_class_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxFillPipeline"}')
    with pytest.raises(StudioError, match="holds a FluxFillPipeline; LoRA Studio trains text-to-image SD1.5, SDXL, "
                                          "Flux.1, .*and .* models"):  # every registered image family
        load_pipeline(str(tmp_path))


def test_loading_draws_no_component_bar(demo, capfd):
    """The console stays quiet: the studio logs "Loading <model>" itself, diffusers' per-component bar is noise."""
    load_pipeline(str(demo.sd15))
    assert "Loading pipeline components" not in capfd.readouterr().err
