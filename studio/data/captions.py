"""Captions on disk: `metadata.csv` (filename,prompt; UTF-8; RFC-4180 quoting) or kohya-style `.txt` sidecars."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from studio.errors import StudioError
from studio.fileio import write_text_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
HEADER = ["filename", "prompt"]


def metadata_path_for(folder: Path, metadata_path: str | Path | None = None) -> Path:
    return Path(metadata_path) if metadata_path else Path(folder) / "metadata.csv"


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_csv_captions(path: Path) -> dict[str, str]:
    """filename → caption from a metadata.csv; a missing/misnamed header or a broken row is a StudioError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StudioError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}). Save it as UTF-8.") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise StudioError(f"{path}: the first line must be the header 'filename,prompt' (found {found}).")
    captions = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise StudioError(f"{path}, line {line_no}: expected 2 columns (filename,prompt), got {len(row)}. "
                              "Quote captions that contain commas: \"a, b\".")
        captions[row[0].strip()] = row[1].strip()
    return captions


def read_sidecar_captions(folder: Path) -> dict[str, str]:
    """filename → caption from `<image stem>.txt` files beside the images (the kohya convention)."""
    captions = {}
    for image in list_images(folder):
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            captions[image.name] = sidecar.read_text(encoding="utf-8").strip()
    return captions


def read_captions(folder: str | Path, metadata_path: str | Path | None = None) -> dict[str, str]:
    """Captions for an image folder: metadata.csv when there is one, else .txt sidecars."""
    folder = Path(folder)
    csv_path = metadata_path_for(folder, metadata_path)
    return read_csv_captions(csv_path) if csv_path.is_file() else read_sidecar_captions(folder)


def write_csv_captions(path: str | Path, captions: dict[str, str]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(sorted(captions.items()))
    return write_text_atomic(path, buffer.getvalue())


def write_sidecar_captions(folder: str | Path, captions: dict[str, str]) -> None:
    for filename, caption in captions.items():
        write_text_atomic(Path(folder) / Path(filename).with_suffix(".txt").name, caption + "\n")
