"""Atomic writes: write beside the target, then rename, so a crash never leaves a half-written file or folder.

A full disk or an unwritable folder during such a write is a StudioError that names the path (`write_errors`), and
the temporary names a killed write leaves behind are swept by `remove_orphans`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from studio.errors import StudioError

# safetensors reports a full disk only in its text: "... No space left on device (os error 28)" (older versions:
# "Os { code: 28, kind: StorageFull, ...").
_DISK_FULL = re.compile(rf"\b(os error |code: ){errno.ENOSPC}\b")
# The temporary names atomic_path (mkstemp: 8 random characters) and atomic_dir give, and nothing else.
_TMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_TMP_DIR = re.compile(r"^\.tmp-.+$")


@contextmanager
def write_errors(path: str | Path, setting: str = "folder") -> Iterator[None]:
    """Writing `path`: a full disk, a read-only or foreign folder, or a file where a folder belongs becomes one
    StudioError naming it and the fix (`setting`: what the user should change), instead of a traceback."""
    try:
        yield
    except StudioError:  # already explained (a nested write)
        raise
    except Exception as exc:
        for cause in _chain(exc):
            code = getattr(cause, "errno", None)
            if code == errno.ENOSPC or (isinstance(cause, SafetensorError) and _DISK_FULL.search(str(cause))):
                existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
                free = shutil.disk_usage(existing).free
                raise StudioError(f"The disk holding {path} is full ({free // 10**6:,} MB free). Free some space "
                                  "and try again; a training run continues from its last checkpoint with "
                                  "resume_from: latest.") from exc
            if code in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StudioError(f"cannot write to {path} ({cause.strerror}): choose another {setting}.") from exc
            if code in (errno.EEXIST, errno.ENOTDIR):
                where = f"{path} is a file" if Path(path).is_file() else f"a folder above {path} is a file"
                raise StudioError(f"cannot create the folder {path}: {where}. Choose another {setting}.") from exc
        raise


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what it was raised from or while handling: torch.save reports a full disk as a RuntimeError raised
    while handling the file's OSError."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; it replaces `target` only if the block succeeds."""
    target = Path(target)
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; users expect their usual file mode
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    with write_errors(target):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def remove_orphans(*folders: Path) -> list[Path]:
    """Delete the temporary files and folders atomic_path / atomic_dir left in `folders` when a write was killed;
    returns them. Only run when no write into these folders can be under way (e.g. at the start of a run)."""
    removed = []
    for folder in folders:
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.is_symlink():
                continue
            if p.is_file() and _TMP_FILE.match(p.name):
                p.unlink()
            elif p.is_dir() and _TMP_DIR.match(p.name):
                shutil.rmtree(p)
            else:
                continue
            removed.append(p)
    return removed


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
