"""Offline, a hub model that is not in the cache is a message at once, not a minute of retries."""

import time

import pytest
from huggingface_hub import constants
from transformers import BlipForConditionalGeneration

from studio import hub_reach
from studio.data.label_models import load_pretrained
from studio.errors import StudioError


@pytest.fixture
def unreachable_hub(monkeypatch, free_port):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline by accident, not by the setting
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody answers there
    monkeypatch.setattr(hub_reach, "_last", None)


def test_an_unreachable_hub_gives_the_missing_model_message_at_once(unreachable_hub):
    assert hub_reach.hub_reachable() is False
    started = time.monotonic()
    with pytest.raises(StudioError, match="is not downloaded.*hf download org/not-a-cached-blip"):
        load_pretrained(BlipForConditionalGeneration, "org/not-a-cached-blip", "captioning")
    assert time.monotonic() - started < 10


def test_a_local_folder_is_loaded_without_asking_the_hub(unreachable_hub, demo):
    model = load_pretrained(BlipForConditionalGeneration, str(demo.blip), "captioning")
    assert model.config.model_type == "blip"
