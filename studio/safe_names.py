"""The one gate between a name the user typed (or a script sent) and a path: every dataset, run, config or file name
the studio acts on is turned into a path here, or refused with one message that says what was wrong and what to do.

Refused: an empty name, an absolute path, `.` / `..` parts, a name the studio keeps for itself (hidden, starting
with '.') or Windows keeps (CON, NUL, COM1...), NUL and other control characters, a part longer than the file
system allows (255 bytes), and anything that — following symlinks at every level — ends up outside the folder it
must stay in.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from studio.errors import StudioError

MAX_COMPONENT_BYTES = 255  # ext4, APFS, NTFS (in UTF-16 units, near enough): longer names are refused by the OS
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
# kind → (the folder under the workspace root it lives in, how a message names it, the file suffix it gets)
KINDS = {"dataset": ("datasets", "dataset", ""), "run": ("runs", "run", ""), "config": ("configs", "config", ".yaml")}


def check_part(part: str, what: str) -> str:
    """One path component, as given; refused with a message naming `what` (e.g. 'run name')."""
    shown = _shown(part)
    if not part or part in {".", ".."}:
        raise StudioError(f"'{shown}' is not a {what}: it names no file or folder. Pick one from the list.")
    if _CONTROL.search(part):
        raise StudioError(f"The {what} '{shown}' holds a control character (NUL, newline, ...). Pick it from the "
                          "list, or type it again without them.")
    if "/" in part or "\\" in part:
        raise StudioError(f"'{shown}' is a path, not a {what}. Give the name alone (pick it from the list).")
    if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
        raise StudioError(f"The {what} '{shown}' is {len(part.encode('utf-8', 'surrogateescape'))} bytes long; file "
                          f"systems allow {MAX_COMPONENT_BYTES}. Use a shorter name.")
    if part.startswith(".") or part.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        raise StudioError(f"'{shown}' is a reserved name (hidden files are the studio's own; CON, NUL, COM1... are "
                          f"Windows devices). Use another {what}.")
    return part


def inside(base: Path, name: str, what: str, *, parts: int = 1) -> Path:
    """`base / name` (`name`: at most `parts` components joined by '/'), refused unless every component is a plain
    name (check_part) and every level, symlinks followed, stays inside `base`."""
    text = str(name if name is not None else "").strip()
    if text.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", text):
        raise StudioError(f"'{_shown(text)}' is an absolute path; the studio takes a {what} (a name inside the "
                          "workspace). Pick one from the list.")
    components = text.split("/") if parts > 1 else [text]
    if len(components) > parts:
        raise StudioError(f"'{_shown(text)}' is not a {what}. Pick one from the list.")
    base = Path(base).resolve()
    path = base
    for part in components:
        path = path / check_part(part, what)
        if path.is_symlink() and not _within(path.resolve(), base):
            raise StudioError(f"The {what} '{_shown(text)}' is a link to {path.resolve()}, outside {base}. The "
                              "studio only reads and writes inside its workspace: copy the files in instead.")
    return path


def workspace_path(root: str | Path, kind: str, name: str) -> Path:
    """The path of the dataset / run / config called `name` in the workspace at `root` (it need not exist yet).
    A dataset may also be given as the Dataset tab's value, `datasets/<name>`."""
    folder, what, suffix = KINDS[kind]
    text = str(name if name is not None else "").strip()
    if kind == "dataset" and text.startswith(f"{folder}/"):
        text = text[len(folder) + 1:]
    if suffix and not text.endswith(suffix):
        text += suffix
    return inside(inside(root, folder, "workspace folder"), text, f"{what} name")  # datasets/ itself may be a link


def cache_key(path: Path) -> str:
    """A cache folder's name for `path`: a hash of the resolved path, never a path built from the user's text."""
    return hashlib.sha256(str(Path(path).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _within(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _shown(text: str, limit: int = 60) -> str:
    """The name as a message shows it: control characters visible, long names shortened."""
    visible = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return visible if len(visible) <= limit else f"{visible[:limit]}… ({len(text)} characters)"
