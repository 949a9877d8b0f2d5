"""TensorBoard logging as an event listener: loss and learning rate per step, the validation loss, sample images
and replies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from studio.events import Event


class TensorBoardListener:
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import
        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, event: Event) -> None:
        if event.kind == "progress":
            self.writer.add_scalar("train/loss", event.data["loss"], event.step)
            self.writer.add_scalar("train/lr", event.data["lr"], event.step)
        elif event.kind == "validation":  # in the same section as train/loss, so the two sit side by side
            self.writer.add_scalar("train/validation_loss", event.data["loss"], event.step)
        elif event.kind == "sample":
            for i, sample in enumerate(event.data["samples"]):
                if sample["image"]:
                    image = np.asarray(Image.open(sample["image"]).convert("RGB"))
                    self.writer.add_image(f"samples/{i}", image, event.step, dataformats="HWC")
                if sample["text"] is not None:
                    self.writer.add_text(f"samples/{i}", f"**{sample['prompt']}**\n\n{sample['text']}", event.step)

    def close(self) -> None:
        self.writer.close()
