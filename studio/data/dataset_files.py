"""File operations on a dataset folder, as the Dataset tab offers them: add uploads under the user's own file names,
delete images, remove caption rows of missing images, rename an image (its caption follows), write one image's
caption, apply a validation problem's fix, and copy a dataset (the demo's, before its first edit).

Every name given here is a plain file name inside the dataset folder; anything else is refused.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from studio.data.captions import (IMAGE_SUFFIXES, UNSUPPORTED_SUFFIXES, list_images, metadata_path_for,
                                  read_caption_rows, read_captions, read_csv_rows, rename_captions, update_captions,
                                  write_csv_captions, write_csv_rows)
from studio.data.text import TEXT_SUFFIXES
from studio.errors import StudioError
from studio.safe_names import MAX_COMPONENT_BYTES, WINDOWS_DEVICES, check_part, inside

# The one obvious fix of each validation problem (studio.data.images names it; apply_fix applies it).
REMOVE_ROW, DELETE_FILE, CAPTION = "remove_row", "delete_file", "caption"
UPLOAD_SUFFIXES = sorted(IMAGE_SUFFIXES | set(TEXT_SUFFIXES) | {".csv"})
METADATA = "metadata.csv"
# Characters Windows, macOS or Linux refuse in a file name (the separators included), and control characters.
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_DROPPABLE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f`$!{}_]')  # ...and those some upload client drops instead
# An upload's stored name is cut to this: room under the file system's limit for the '.<name>.<random>.tmp' of an
# atomic write beside it and a sidecar's '.txt'.
STORED_NAME_BYTES = MAX_COMPONENT_BYTES - 40


def safe_filename(name: str) -> str:
    """The upload's own file name, with only what a file system refuses changed: any folder part is dropped (both
    separators), unsafe characters become '_', leading dots and spaces and trailing dots and spaces go, a Windows
    device name gets a leading '_', and a name over the length limit is cut (its suffix kept). Spaces, accents and
    brackets stay."""
    base = re.split(r"[/\\]", str(name))[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(". ").rstrip(". ")
    if cleaned.split(".")[0].upper() in WINDOWS_DEVICES:
        cleaned = "_" + cleaned
    return _shortened(cleaned or "upload")


def _shortened(name: str) -> str:
    """`name` cut to STORED_NAME_BYTES, its suffix kept."""
    suffix = Path(name).suffix if len(Path(name).suffix) < 16 else ""
    stem = name[:len(name) - len(suffix)] if suffix else name
    while len((stem + suffix).encode("utf-8")) > STORED_NAME_BYTES:
        stem = stem[:-1]
    return stem + suffix


def dataset_member(folder: Path, name: str) -> Path:
    """The file `name` directly inside the dataset folder (studio.safe_names: a path, a link leaving the folder or a
    missing file is refused)."""
    name = str(name or "").strip()
    path = inside(folder, name, "file name of this dataset")
    if not path.is_file():
        raise StudioError(f"{name} is not in {Path(folder).name} (any more). Refresh the dataset and pick again.")
    return path


# --- delete, remove rows, rename, caption --------------------------------------------------------------------------

def delete_images(folder: Path, names: list[str]) -> list[str]:
    """Delete these images (or files of an unsupported image format) and their captions: rows and sidecars."""
    paths = [dataset_member(folder, name) for name in names]
    others = [p.name for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES | UNSUPPORTED_SUFFIXES]
    if others:
        raise StudioError(f"Only images are deleted here; {', '.join(others)} is not one. Remove other files in your "
                          "file manager.")
    for path in paths:
        path.unlink()
        path.with_suffix(".txt").unlink(missing_ok=True)
    update_captions(folder, {path.name: None for path in paths})
    return [path.name for path in paths]


def stale_rows(folder: Path) -> list[str]:
    """Files metadata.csv names that are not in the folder."""
    present = {p.name for p in list_images(folder)}
    return sorted({name for name, _ in read_caption_rows(folder)} - present)


def remove_rows(folder: Path, names: list[str] | None = None) -> list[str]:
    """Remove the caption rows of these missing files (default: of every missing file)."""
    stale = stale_rows(folder)
    names = stale if names is None else list(names)
    present = [name for name in names if name not in stale]
    if present:
        raise StudioError(f"{', '.join(present)}: no stale row to remove (the image is there, or no row names it). "
                          "To drop an image, delete it.")
    update_captions(folder, {name: None for name in names})
    return names


def rename_image(folder: Path, old: str, new: str) -> str:
    """Rename an image; its caption (metadata.csv rows or sidecar) follows. Returns the new name."""
    source = dataset_member(folder, old)
    if source.suffix.lower() not in IMAGE_SUFFIXES:
        raise StudioError(f"{old} is not an image of this dataset. Pick an image to rename.")
    check_part(new.strip(), "new file name")  # a name too long is refused here, not silently cut
    target_name = safe_filename(new.strip())
    if not Path(target_name).suffix:
        target_name += source.suffix
    if Path(target_name).suffix.lower() != source.suffix.lower():
        raise StudioError(f"Renaming does not convert the image: give {old} a name ending in {source.suffix}.")
    target = inside(folder, target_name, "new file name")
    if target_name == old:
        raise StudioError(f"{old} already has that name.")
    if target.exists():
        raise StudioError(f"{target_name} already exists in {Path(folder).name}. Choose another name.")
    source.rename(target)
    rename_captions(folder, old, target_name)
    return target_name


def set_caption(folder: Path, name: str, caption: str) -> None:
    """Write one image's caption where the dataset keeps captions; several rows for it become this one."""
    path = dataset_member(folder, name)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise StudioError(f"{name} is not an image of this dataset; only images have captions.")
    if not (caption or "").strip():
        raise StudioError(f"The caption for {name} is empty. Write one (or run Auto-label).")
    update_captions(folder, {name: caption.strip()})


def save_caption_table(folder: Path, rows: list[tuple[str, str]]) -> int:
    """Store the captions of a table of (file, caption) rows that differ from the stored ones (a broken metadata.csv
    is replaced by the table); returns how many were written."""
    images = {p.name for p in list_images(folder)}
    if not images:
        raise StudioError(f"{Path(folder).name} holds no images: only image datasets have captions.")
    table = {str(name).strip(): str(caption or "").strip() for name, caption in rows if str(name).strip() in images}
    try:
        stored = read_captions(folder)
    except StudioError:  # a broken metadata.csv: the table replaces it
        write_csv_captions(metadata_path_for(folder), table)
        return len(table)
    changes = {name: caption for name, caption in table.items() if caption != stored.get(name, "")}
    update_captions(folder, changes)
    return len(changes)


_FIXES = {  # fix → (what it does to (folder, file, caption), what it says it did)
    REMOVE_ROW: (lambda folder, name, caption: remove_rows(folder, [name]), "Removed the row of {name}."),
    DELETE_FILE: (lambda folder, name, caption: delete_images(folder, [name]), "Deleted {name} and its caption."),
    CAPTION: (set_caption, "Saved the caption of {name}."),
}


def apply_fix(folder: Path, fix: str, name: str, caption: str = "") -> str:
    """Apply a validation problem's fix (studio.data.images names it for each problem); returns what it did."""
    if fix not in _FIXES:
        raise StudioError(f"'{fix}' is not a fix; one of: {', '.join(_FIXES)}.")
    action, done = _FIXES[fix]
    action(folder, name, caption)
    return done.format(name=name)


# --- uploads -------------------------------------------------------------------------------------------------------

@dataclass
class UploadResult:
    added: list[str] = field(default_factory=list)  # stored names
    renamed: dict[str, str] = field(default_factory=dict)  # the user's name → the stored one, where they differ
    skipped: list[str] = field(default_factory=list)  # the user's names of files of other types
    captions: int = 0  # captions taken from an uploaded metadata.csv or .txt sidecars
    notes: list[str] = field(default_factory=list)  # what was not taken, and why


def add_uploads(folder: Path, uploads: list[tuple[str | Path, str]]) -> UploadResult:
    """Copy uploaded files — (temporary path, the user's file name) pairs — into the dataset under the user's names
    (safe_filename). Captions that come along follow renamed images: an uploaded metadata.csv is merged into the
    dataset's (its rows win), and a `.txt` beside an image is that image's caption (kept as a sidecar, or merged into
    metadata.csv when the dataset has one)."""
    folder = Path(folder)
    result = UploadResult()
    accepted = [(Path(src), name) for src, name in uploads if _accepted(name)]
    result.skipped = [name for _, name in uploads if not _accepted(name)]
    stored = _stored_names([name for _, name in accepted], result)
    image_stems = {p.stem: p.stem for p in list_images(folder)}  # the user's stem → the stored image's stem
    image_stems.update({Path(name).stem: Path(stored[name]).stem for _, name in accepted
                        if Path(name).suffix.lower() in IMAGE_SUFFIXES})
    sidecars = {}
    for src, name in accepted:
        if Path(name).suffix.lower() == ".txt" and Path(name).stem in image_stems:
            sidecars[image_stems[Path(name).stem]] = src
        elif name.lower() != METADATA:
            shutil.copyfile(src, _write_target(folder, stored[name]))
            result.added.append(stored[name])
    for src in [src for src, name in accepted if name.lower() == METADATA][-1:]:
        try:
            result.captions += _merge_metadata(folder, src, stored)
            result.added.append(METADATA)
        except StudioError as exc:
            result.notes.append(f"The uploaded metadata.csv was not added: {str(exc).replace(str(src), 'it')}")
    result.captions += _add_sidecars(folder, sidecars, result)
    return result


def _accepted(name: str) -> bool:
    suffix = Path(name).suffix.lower()
    return suffix in UPLOAD_SUFFIXES and (suffix != ".csv" or name.lower() == METADATA)


def _stored_names(names: list[str], result: UploadResult) -> dict[str, str]:
    """The user's name → the name it is stored under: safe, and distinct within one upload."""
    stored, taken = {}, set()
    for name in names:
        safe = candidate = safe_filename(name)
        number = 2
        while candidate.lower() in taken:
            candidate = f"{Path(safe).stem} ({number}){Path(safe).suffix}"
            number += 1
        taken.add(candidate.lower())
        stored[name] = candidate
        if candidate != name:
            result.renamed[name] = candidate
    return stored


def _merge_metadata(folder: Path, upload: Path, stored: dict[str, str]) -> int:
    rows = [(_uploaded_name(name, stored), caption) for name, caption in read_csv_rows(upload)]
    path = metadata_path_for(folder)
    try:
        existing = read_csv_rows(path) if path.is_file() else []
    except StudioError:
        existing = []  # a broken metadata.csv: the upload replaces it
    named = {name for name, _ in rows}
    write_csv_rows(path, [row for row in existing if row[0] not in named] + rows)
    return len(rows)


def _uploaded_name(name: str, stored: dict[str, str]) -> str:
    """The stored name of the upload a metadata.csv row names: by the user's file name, else by the name without the
    characters some uploader drops or replaces (gradio_client strips ':' and '$' before sending); a row that names
    no upload keeps its name."""
    if name in stored:
        return stored[name]
    matches = {new for old, new in stored.items() if _loose(old) == _loose(name)}
    return matches.pop() if len(matches) == 1 else name


def _loose(name: str) -> str:
    return _DROPPABLE.sub("", name).strip(". ")


def _add_sidecars(folder: Path, sidecars: dict[str, Path], result: UploadResult) -> int:
    """Uploaded .txt captions, stored under their image's stored name (merged into metadata.csv when there is one)."""
    images = {p.stem: p.name for p in list_images(folder)}
    if metadata_path_for(folder).is_file():
        update_captions(folder, {images[stem]: _read_caption(src) for stem, src in sidecars.items()})
    else:
        for stem, src in sidecars.items():
            shutil.copyfile(src, _write_target(folder, f"{stem}.txt"))
            result.added.append(f"{stem}.txt")
    return len(sidecars)


def _write_target(folder: Path, name: str) -> Path:
    """Where an upload is stored: a link of that name is replaced, never written through."""
    target = folder / name
    if target.is_symlink():
        target.unlink()
    return target


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise StudioError(f"{path.name} is not UTF-8 text. Save the caption as UTF-8 and upload it again.") from None


# --- copies --------------------------------------------------------------------------------------------------------

def copy_dataset(source: Path, datasets_dir: Path) -> Path:
    """Copy a dataset folder into `datasets_dir`, under its name or the first free `name-N`. Hidden files stay
    behind: caches (.studio-cache) and markers (the demo's .demo-version) belong to the original."""
    target, number = Path(datasets_dir) / source.name, 2
    while target.exists():
        target, number = Path(datasets_dir) / f"{source.name}-{number}", number + 1
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"))
    return target
