"""Validation samples held out of a dataset: the same split for the same seed, so training, the health check and a
rerun agree on which samples are never trained on."""

from __future__ import annotations

import math
import random

from studio.config import RunConfig
from studio.errors import StudioError


def split_held_out(samples: list, cfg: RunConfig, what: str) -> tuple[list, list]:
    """`samples` split into (training, held out) as validation_split asks; the same split for the same seed."""
    if not cfg.validation_split:
        return samples, []
    count = len(samples)
    held = math.floor(count * cfg.validation_split + 0.5)
    where = f"{count} {what} in {cfg.train_data_dir}"
    if held == 0:
        needed = math.ceil(50 / count) / 100  # the smallest fraction that rounds to one sample
        instead = (f"raise validation_split to {needed}, " if needed <= 0.5 and count > 1 else "") + "add samples"
        raise StudioError(f"validation_split {cfg.validation_split} holds out none of the {where}; {instead}, or "
                          "give a folder of held-out samples as validation_dir.")
    if held == count:
        raise StudioError(f"validation_split {cfg.validation_split} would hold out all of the {where} and train on "
                          "none; add samples, or give a folder of held-out samples as validation_dir.")
    chosen = set(random.Random(f"validation/{cfg.seed}").sample(range(count), held))
    return ([s for i, s in enumerate(samples) if i not in chosen], [s for i, s in enumerate(samples) if i in chosen])
