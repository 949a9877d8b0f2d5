"""Features the frozen models compute from the data (VAE latents, text embeddings), kept on disk between runs.

kohya's `--cache_latents_to_disk`: the next run on the same data reads a file instead of running the encoder. An
entry's key names everything its value depends on — model files, image bytes, bucket, flip, dtype, device — so a
changed input is a different entry, never a stale one. One safetensors file per entry, written atomically, with
its key in the header; a file that cannot be read or holds another key (partial, corrupt) is recomputed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from studio.errors import StudioError
from studio.fileio import atomic_path

CACHE_DIR = ".studio-cache"  # inside the dataset folder, like kohya's .npz files beside the images
VERSION = "2"  # bump when cached values change meaning (pixel loading, latent scaling, prompt encoding)

Features = dict[str, torch.Tensor]


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def model_fingerprint(base_model: str) -> str:
    """Identity of a model: the name, size and modification time of each of its files (a local checkpoint or
    folder); for a hub id, the id alone."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
    else:
        files = {path.name: path} if path.is_file() else {}
    listing = [str(path.resolve()) if path.exists() else base_model]
    listing += [f"{name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for name, p in files.items()]
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]


class DiskCache:
    def __init__(self, folder: Path, log: Callable[[str], None]):
        self.folder = folder
        self.log = log
        self.writable = True
        self.hits = 0  # entries read from disk, for the log

    def fetch(self, keys: list[str], compute: Callable[[list[int]], list[Features]]) -> list[Features]:
        """The features of each key: read from disk where a good file exists, the rest from `compute(positions)`
        (positions in `keys` of the missing ones, computed in one call) and then stored."""
        found = [self._read(key) for key in keys]
        missing = [i for i, features in enumerate(found) if features is None]
        self.hits += len(keys) - len(missing)
        if missing:
            for i, features in zip(missing, compute(missing)):
                found[i] = features
                self._write(keys[i], features)
        return found

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def _read(self, key: str) -> Features | None:
        try:
            with safe_open(self._path(key), framework="pt") as fh:
                if (fh.metadata() or {}).get("key") != key:
                    return None
                return {name: fh.get_tensor(name) for name in fh.keys()}
        except (OSError, SafetensorError):  # absent, truncated or not safetensors at all: compute it again
            return None

    def _write(self, key: str, features: Features) -> None:
        if not self.writable:
            return
        try:
            with atomic_path(self._path(key)) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in features.items()}, str(tmp),
                          metadata={"key": key})
        except (OSError, StudioError) as exc:  # a read-only dataset folder, a full disk: train on, uncached
            self.writable = False
            self.log(f"Cannot write the feature cache in {self.folder} ({exc}); continuing without it.")
