"""Writing an adapter `.safetensors` with its header metadata, atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.fileio import atomic_path


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write an adapter file in one step: a crash never leaves half a file under the final name."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return path
