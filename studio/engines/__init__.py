"""The engines behind the interface in base.py; the run's family (studio/families/) names the one that trains it."""

from __future__ import annotations

import torch

from studio.config import RunConfig
from studio.engines.base import Engine
from studio.events import EventSink
from studio.families import resolve_family


def make_engine(cfg: RunConfig, device: torch.device, autocast: torch.dtype | None, events: EventSink) -> Engine:
    # Imported on demand so the UI and CLI start without loading diffusers or transformers' model code.
    return resolve_family(cfg).engine_class()(cfg, device, autocast, events)
