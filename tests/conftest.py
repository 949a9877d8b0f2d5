"""Shared fixtures: the tiny real models and datasets from studio.demo, built once per test session."""

import os

# Offline before any HF import: a hub lookup then fails in ~2 s instead of ~25 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402

import pytest  # noqa: E402

from studio.demo import ensure_demo  # noqa: E402


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Tiny SD1.5/SDXL/Llama models and the demo datasets (DemoPaths)."""
    return ensure_demo(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="session")
def free_port():
    """A function returning a loopback port nobody listens on."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return pick
