"""Bulk tag edits over an image dataset's captions, with undo of the last one.

A caption's tags are its comma-separated parts, as training reads them (studio.data.images.augment_caption); tags
match exactly (after trimming spaces). An edit — add, remove or replace tags, put the trigger word first, order each
caption's tags by how many images use them — applies to every image, or to those a search selects. It is written
where the dataset keeps its captions (metadata.csv, else `.txt` sidecars: studio.data.captions), and the captions it
replaced are kept in the dataset's .studio-cache so that undo survives a restart.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from studio.data.captions import (list_images, metadata_path_for, read_csv_captions, read_sidecar_captions,
                                  write_csv_captions, write_sidecar_captions)
from studio.errors import StudioError
from studio.fileio import write_errors, write_text_atomic

OPERATIONS = {"add": "add tags", "remove": "remove tags", "replace": "replace a tag", "trigger": "put the trigger word "
              "first", "sort": "sort tags by frequency"}
UNDO_FILE = "tag-edit-undo.json"


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def tag_counts(captions: Iterable[str]) -> Counter:
    """Tag → how many captions use it (a tag repeated within one caption counts once)."""
    return Counter(tag for caption in captions for tag in dict.fromkeys(split_tags(caption)))


# --- where the captions live -----------------------------------------------------------------------------------------

@dataclass
class CaptionStore:
    """A dataset's captions and where they are written: metadata.csv (also when the dataset has no captions yet) or,
    when there is no CSV but there are sidecars, one `.txt` per image."""
    folder: Path
    csv_path: Path | None  # None: .txt sidecars
    captions: dict[str, str]  # file name → caption, as stored (CSV rows for missing images included)
    images: list[str]  # the image files present, the ones an edit may touch

    @classmethod
    def open(cls, folder: str | Path, metadata_path: str | Path | None = None) -> CaptionStore:
        folder = Path(folder)
        if not folder.is_dir():
            raise StudioError(f"Dataset folder {folder} does not exist. Pick a dataset from the list.")
        images = [p.name for p in list_images(folder)]
        if not images:
            raise StudioError(f"{folder} holds no images: the tag editor edits image captions. Upload images first.")
        csv_path = metadata_path_for(folder, metadata_path)
        sidecars = read_sidecar_captions(folder)
        if csv_path.is_file() or not sidecars:
            return cls(folder, csv_path, read_csv_captions(csv_path) if csv_path.is_file() else {}, images)
        return cls(folder, None, sidecars, images)

    @property
    def where(self) -> str:
        return self.csv_path.name if self.csv_path else ".txt captions"

    def caption(self, name: str) -> str:
        return self.captions.get(name, "")

    def write(self, new: dict[str, str | None]) -> None:
        """Store these captions; None removes an image's caption (its CSV row, or its sidecar)."""
        if self.csv_path:
            merged = {**self.captions, **new}
            write_csv_captions(self.csv_path, {name: c for name, c in merged.items() if c is not None})
        else:
            write_sidecar_captions(self.folder, {name: c for name, c in new.items() if c is not None})
            for name in (name for name, c in new.items() if c is None):
                self.folder.joinpath(name).with_suffix(".txt").unlink(missing_ok=True)
        self.captions = {name: c for name, c in {**self.captions, **new}.items() if c is not None}


# --- selecting and editing -------------------------------------------------------------------------------------------

def select(store: CaptionStore, search: str = "") -> list[str]:
    """The images whose captions have every tag of `search` (comma-separated) and none of its `-tag`s; all images
    when the search is empty."""
    terms = split_tags(search or "")
    wanted = {t for t in terms if not t.startswith("-")}
    unwanted = {t[1:].strip() for t in terms if t.startswith("-")}
    selected = []
    for name in store.images:
        tags = set(split_tags(store.caption(name)))
        if wanted <= tags and not unwanted & tags:
            selected.append(name)
    return selected


@dataclass
class EditResult:
    what: str  # e.g. "remove tags 'blurry'"
    selected: int
    changed: int
    where: str

    def summary(self) -> str:
        if not self.changed:
            return f"Nothing to change: {self.what} leaves the {self.selected} selected caption(s) as they are."
        return (f"{self.what[0].upper()}{self.what[1:]}: changed {self.changed} of {self.selected} selected "
                f"caption(s) in {self.where}. Undo reverts it.")


def bulk_edit(folder: str | Path, operation: str, tag: str = "", new_tag: str = "", search: str = "", *,
              metadata_path: str | Path | None = None) -> EditResult:
    """Apply one operation (OPERATIONS) to the captions of the images `search` selects, and keep what it replaced
    for `undo_last_edit`. An edit that changes nothing keeps the previous edit's undo."""
    store = CaptionStore.open(folder, metadata_path)
    edit, what = _edit_function(operation, tag, new_tag, tag_counts(store.caption(n) for n in store.images))
    names = select(store, search)
    if search.strip():
        what += f" on the images matching '{search.strip()}'"
    after = {name: join_tags(edit(split_tags(store.caption(name)))) for name in names}
    changed = {name: caption for name, caption in after.items() if caption != store.caption(name)}
    if changed:
        _save_undo(store, what, {name: store.captions.get(name) for name in changed}, changed)
        store.write(changed)
    return EditResult(what, len(names), len(changed), store.where)


def _edit_function(operation: str, tag: str, new_tag: str,
                   counts: Counter) -> tuple[Callable[[list[str]], list[str]], str]:
    """The per-caption edit for an operation (a function of its tag list) and how to describe it."""
    tags, new_tags = split_tags(tag or ""), split_tags(new_tag or "")
    quoted = ", ".join(f"'{t}'" for t in tags)
    if operation == "add":
        _need(tags, "the tag(s) to add")
        return (lambda old: old + [t for t in tags if t not in old]), f"add {quoted}"
    if operation == "remove":
        _need(tags, "the tag(s) to remove")
        return (lambda old: [t for t in old if t not in tags]), f"remove {quoted}"
    if operation == "replace":
        _need(tags, "the tag to replace", one=True)
        _need(new_tags, "what to replace it with (to drop a tag, use remove)")
        return (lambda old: _dedupe(t2 for t in old for t2 in (new_tags if t == tags[0] else [t]))), \
            f"replace {quoted} with {', '.join(repr(t) for t in new_tags)}"
    if operation == "trigger":
        _need(tags, "the trigger word", one=True)
        return (lambda old: tags + [t for t in old if t != tags[0]]), f"put the trigger word {quoted} first"
    if operation == "sort":
        return (lambda old: sorted(old, key=lambda t: -counts[t])), "sort tags by frequency"
    raise StudioError(f"Unknown tag edit '{operation}'. Choose one of: {', '.join(OPERATIONS)}.")


def _need(tags: list[str], what: str, one: bool = False) -> None:
    if not tags:
        raise StudioError(f"Type {what} first.")
    if one and len(tags) > 1:
        raise StudioError(f"Give one tag as {what}, not {len(tags)} ({', '.join(tags)}): a comma separates tags.")


def _dedupe(tags: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(tags))


# --- undo ------------------------------------------------------------------------------------------------------------

def _undo_path(folder: Path) -> Path:
    from studio.data.feature_cache import CACHE_DIR  # that module loads torch; the UI imports this one at start
    return folder / CACHE_DIR / UNDO_FILE


def _save_undo(store: CaptionStore, what: str, before: dict[str, str | None], after: dict[str, str]) -> None:
    write_text_atomic(_undo_path(store.folder), json.dumps({"what": what, "before": before, "after": after},
                                                           ensure_ascii=False, indent=1))


def undo_last_edit(folder: str | Path, metadata_path: str | Path | None = None) -> str:
    """Put back the captions the last bulk edit replaced; a caption edited by hand since is kept (and named)."""
    folder = Path(folder)
    path = _undo_path(folder)
    if not path.is_file():
        raise StudioError(f"There is no bulk tag edit to undo in {folder.name} (only the last one can be undone, "
                          "once).")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        before, after = record["before"], record["after"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StudioError(f"The undo record {path} is damaged ({exc}); delete it. Your captions are unchanged.") \
            from None
    store = CaptionStore.open(folder, metadata_path)
    untouched = {name: before[name] for name, caption in after.items() if store.captions.get(name) == caption}
    edited_since = sorted(set(after) - set(untouched))
    store.write(untouched)
    with write_errors(path):
        path.unlink()
    message = f"Undid '{record.get('what', 'the last edit')}' on {len(untouched)} caption(s) in {store.where}."
    if edited_since:
        message += (f" Kept {len(edited_since)} caption(s) changed since that edit: "
                    f"{', '.join(edited_since[:5])}{' ...' if len(edited_since) > 5 else ''}.")
    return message


def tag_table(folder: str | Path, search: str = "", metadata_path: str | Path | None = None) -> list[tuple[str, int]]:
    """(tag, images using it) for the images `search` selects, most used first (ties by name)."""
    store = CaptionStore.open(folder, metadata_path)
    counts = tag_counts(store.caption(name) for name in select(store, search))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
