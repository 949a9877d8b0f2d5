"""Writing an adapter `.safetensors` with its header metadata, atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save, save_file

from studio.export.metadata import hash_fields
from studio.fileio import atomic_path


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write an adapter file in one step (a crash never leaves half a file under the final name), with kohya's
    sshs_* hashes in its header."""
    path = Path(path)
    metadata = {k: str(v) for k, v in metadata.items()}
    # Hashed as kohya does, serialized with the ss_* fields only: the legacy hash moves with the header's length, and
    # metadata a user adds later must not change it.
    metadata.update(hash_fields(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
