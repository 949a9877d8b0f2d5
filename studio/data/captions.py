"""Captions on disk: `metadata.csv` (filename,prompt; UTF-8; RFC-4180 quoting) or kohya-style `.txt` sidecars."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from studio.errors import StudioError
from studio.fileio import write_text_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# Files that look like images but that we do not read; named so the user knows to convert them.
UNSUPPORTED_SUFFIXES = {".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".psd", ".svg", ".jxl", ".raw"}
HEADER = ["filename", "prompt"]


def metadata_path_for(folder: Path, metadata_path: str | Path | None = None) -> Path:
    return Path(metadata_path) if metadata_path else Path(folder) / "metadata.csv"


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_csv_rows(path: Path) -> list[tuple[str, str]]:
    """(filename, caption) rows of a metadata.csv in file order, duplicates kept; a missing/misnamed header or a broken
    row is a StudioError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StudioError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}). Save it as UTF-8.") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise StudioError(f"{path}: the first line must be the header 'filename,prompt' (found {found}).")
    captions = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise StudioError(f"{path}, line {line_no}: expected 2 columns (filename,prompt), got {len(row)}. "
                              "Quote captions that contain commas: \"a, b\".")
        captions.append((row[0].strip(), row[1].strip()))
    return captions


def read_csv_captions(path: Path) -> dict[str, str]:
    """filename → caption from a metadata.csv (of duplicate rows, the last; see `conflicting_captions`)."""
    return dict(read_csv_rows(path))


def read_sidecar_captions(folder: Path) -> dict[str, str]:
    """filename → caption from `<image stem>.txt` files beside the images (the kohya convention)."""
    captions = {}
    for image in list_images(folder):
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            captions[image.name] = sidecar.read_text(encoding="utf-8").strip()
    return captions


def read_caption_rows(folder: str | Path, metadata_path: str | Path | None = None) -> list[tuple[str, str]]:
    """(filename, caption) pairs: metadata.csv's rows when there is one (duplicates kept), else the .txt sidecars."""
    folder = Path(folder)
    csv_path = metadata_path_for(folder, metadata_path)
    return read_csv_rows(csv_path) if csv_path.is_file() else list(read_sidecar_captions(folder).items())


def read_captions(folder: str | Path, metadata_path: str | Path | None = None) -> dict[str, str]:
    """Captions for an image folder: metadata.csv when there is one, else .txt sidecars."""
    return dict(read_caption_rows(folder, metadata_path))


def conflicting_captions(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Files that several rows give different captions: file → its distinct captions in row order."""
    captions: dict[str, list[str]] = {}
    for name, caption in rows:
        if caption not in captions.setdefault(name, []):
            captions[name].append(caption)
    return {name: found for name, found in captions.items() if len(found) > 1}


def write_csv_rows(path: str | Path, rows: list[tuple[str, str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def write_csv_captions(path: str | Path, captions: dict[str, str]) -> Path:
    return write_csv_rows(path, sorted(captions.items()))


def write_sidecar_captions(folder: str | Path, captions: dict[str, str]) -> None:
    for filename, caption in captions.items():
        write_text_atomic(Path(folder) / Path(filename).with_suffix(".txt").name, caption + "\n")


# --- editing where the dataset keeps its captions ------------------------------------------------------------------

def keeps_sidecars(folder: str | Path) -> bool:
    """Captions live in .txt sidecars: there is no metadata.csv and at least one sidecar (else metadata.csv)."""
    folder = Path(folder)
    return not metadata_path_for(folder).is_file() and bool(read_sidecar_captions(folder))


def update_captions(folder: str | Path, changes: dict[str, str | None]) -> None:
    """Set these files' captions (None removes them) where the dataset keeps its captions. In metadata.csv each
    changed file ends with one row, where its first row was; the other rows stay as they are, duplicates included."""
    folder = Path(folder)
    if keeps_sidecars(folder):
        write_sidecar_captions(folder, {name: caption for name, caption in changes.items() if caption is not None})
        for name in [name for name, caption in changes.items() if caption is None]:
            (folder / Path(name).with_suffix(".txt").name).unlink(missing_ok=True)
        return
    csv_path = metadata_path_for(folder)
    rows = read_csv_rows(csv_path) if csv_path.is_file() else []
    changed = _changed_rows(rows, changes)
    if changed != rows:  # removing captions a dataset never had writes nothing (no empty metadata.csv)
        write_csv_rows(csv_path, changed)


def _changed_rows(rows: list[tuple[str, str]], changes: dict[str, str | None]) -> list[tuple[str, str]]:
    """A changed file's first row takes its new caption (None: goes too) and its later rows go; new files are
    appended."""
    changed, seen = [], set()
    for name, caption in rows:
        if name not in changes:
            changed.append((name, caption))
        elif name not in seen:
            seen.add(name)
            changed += [(name, changes[name])] if changes[name] is not None else []
    return changed + [(name, caption) for name, caption in changes.items() if name not in seen and caption is not None]


def rename_captions(folder: str | Path, old: str, new: str) -> None:
    """The captions of file `old` now name `new`: its metadata.csv rows, or its sidecar."""
    folder = Path(folder)
    csv_path = metadata_path_for(folder)
    if csv_path.is_file():
        write_csv_rows(csv_path, [(new if name == old else name, caption) for name, caption in read_csv_rows(csv_path)])
    sidecar = folder / Path(old).with_suffix(".txt").name
    if sidecar.is_file():
        sidecar.rename(folder / Path(new).with_suffix(".txt").name)
