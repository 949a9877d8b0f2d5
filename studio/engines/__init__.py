"""One engine per model family behind the interface in base.py; the loop asks `make_engine` for the right one."""

from __future__ import annotations

import importlib

import torch

from studio.config import IMAGE_TASK, TEXT_TASK, RunConfig
from studio.engines.base import Engine
from studio.events import EventSink

# Imported on demand so the UI and CLI start without loading diffusers or transformers' model code.
ENGINES = {IMAGE_TASK: "studio.engines.diffusion:DiffusionEngine", TEXT_TASK: "studio.engines.llm:LLMEngine"}


def make_engine(cfg: RunConfig, device: torch.device, autocast: torch.dtype | None, events: EventSink) -> Engine:
    module, name = ENGINES[cfg.task_type].split(":")
    return getattr(importlib.import_module(module), name)(cfg, device, autocast, events)
