"""Training checkpoints: adapter weights + everything needed to continue a run exactly.

A checkpoint is a folder `checkpoints/step-000100/` with `adapter.safetensors` and `state.pt` (optimizer, LR
schedule, grad scaler, position in the data, RNG states). It is written into a temporary folder and renamed into
place, so a kill during the write never leaves a half checkpoint behind. `state.pt` is read with
`weights_only=True`: it holds tensors and plain values only.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from studio.errors import StudioError, refuse_pickle
from studio.fileio import atomic_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where a run is: updates done, the updates done in the current epoch (one per group of samples), and the
    seconds trained to get here (summed over the sessions of a resumed run)."""
    step: int = 0
    epoch: int = 0
    update_in_epoch: int = 0
    seconds: float = 0.0


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def capture_rng() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy arrays are not allowed under weights_only loading; keep the key table as a tensor.
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, adapter: dict[str, torch.Tensor], training: dict, position: Position,
                    keep: int) -> Path:
    """Write a checkpoint atomically and prune the oldest beyond `keep`."""
    final = checkpoints_dir(output_dir) / f"step-{position.step:06d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, tmp / "adapter.safetensors")
        with open(tmp / "state.pt", "wb") as f:  # a Python file: a full disk then shows as OSError ENOSPC
            torch.save({**training, "position": vars(position), "rng": capture_rng()}, f)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path:
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise StudioError(f"resume_from is 'latest' but {checkpoints_dir(output_dir)} holds no checkpoint. "
                              "Remove resume_from to start a new run.")
        return found[-1]
    path = Path(resume_from)
    if not (path / "state.pt").is_file() or not (path / "adapter.safetensors").is_file():
        raise StudioError(f"resume_from {path} is not a checkpoint folder (it needs state.pt and "
                          "adapter.safetensors). Point it at output_dir/checkpoints/step-N or use 'latest'.")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, Position]:
    adapter = load_file(path / "adapter.safetensors")
    try:
        training = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's restricted unpickler met something else than our state
        raise refuse_pickle(f"resume_from: {path / 'state.pt'} holds more than the tensors and plain values Studio "
                            "writes there (or it is damaged)",
                            "Resume from another checkpoint, or delete this one if you did not make it.") from exc
    return adapter, training, Position(**training.pop("position"))
