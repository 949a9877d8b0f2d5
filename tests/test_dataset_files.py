"""Managing a dataset's files: the data module (studio.data.dataset_files) and the Dataset tab's actions through
gradio_client — uploads under the user's names, delete, rename, stale rows, each problem's fix, conflicting
duplicate rows, and the demo dataset copied on its first edit."""

import shutil
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from studio.data import dataset_files as files
from studio.data.captions import read_csv_rows, read_sidecar_captions, write_csv_rows
from studio.data.dataset_files import CAPTION, DELETE_FILE, REMOVE_ROW, safe_filename
from studio.data.images import inspect_dataset
from studio.errors import StudioError
from studio.ui.app import build_app, launch


def image(path: Path, colour="red", size=(64, 64)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def dataset(folder: Path, names: list[str], rows: list[tuple[str, str]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image(folder / name)
    if rows is not None:
        write_csv_rows(folder / "metadata.csv", rows)
    return folder


# --- the data module -------------------------------------------------------------------------------------------------

def test_safe_filename_keeps_the_users_name():
    assert safe_filename("photo 2 (été) [v1].png") == "photo 2 (été) [v1].png"  # spaces, accents, brackets stay
    assert safe_filename('a:b?c*"d|e<f>.png') == "a_b_c__d_e_f_.png"
    assert safe_filename("../../etc/passwd.png") == "passwd.png"
    assert safe_filename("C:\\Users\\me\\photo 2.png") == "photo 2.png"
    assert safe_filename(".hidden.png") == "hidden.png" and safe_filename("trailing. ") == "trailing"
    assert safe_filename("CON.png") == "_CON.png" and safe_filename("..") == "upload"


def test_uploads_keep_names_and_captions_follow_renamed_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    uploads = [(image(src / "1.png"), "photo 2.png"), (image(src / "2.png"), "a:b.png"),
               (image(src / "3.png"), "a_b.png"), (image(src / "4.gif"), "anim.gif")]
    write_csv_rows(src / "m.csv", [("photo 2.png", "a photo"), ("a:b.png", "colon"), ("a_b.png", "underscore")])
    folder = dataset(tmp_path / "ds", [])

    result = files.add_uploads(folder, uploads + [(src / "m.csv", "metadata.csv")])

    assert sorted(result.added) == ["a_b (2).png", "a_b.png", "metadata.csv", "photo 2.png"]
    assert result.renamed == {"a:b.png": "a_b.png", "a_b.png": "a_b (2).png"} and result.skipped == ["anim.gif"]
    assert read_csv_rows(folder / "metadata.csv") == [("photo 2.png", "a photo"), ("a_b.png", "colon"),
                                                      ("a_b (2).png", "underscore")]
    assert inspect_dataset(folder).ok


def test_uploaded_sidecars_follow_their_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "cap.txt").write_text("a square\n", encoding="utf-8")
    (src / "chat.txt").write_text("not a caption: no image of that name\n", encoding="utf-8")
    kohya = dataset(tmp_path / "kohya", [])
    files.add_uploads(kohya, [(image(src / "x.png"), "sq:1.png"), (src / "cap.txt", "sq:1.txt"),
                              (src / "chat.txt", "notes.txt")])
    assert read_sidecar_captions(kohya) == {"sq_1.png": "a square"} and (kohya / "notes.txt").is_file()

    with_csv = dataset(tmp_path / "csv", ["old.png"], [("old.png", "kept")])
    files.add_uploads(with_csv, [(image(src / "x.png"), "sq:1.png"), (src / "cap.txt", "sq:1.txt")])
    assert read_csv_rows(with_csv / "metadata.csv") == [("old.png", "kept"), ("sq_1.png", "a square")]
    assert not (with_csv / "sq_1.txt").exists()  # merged into metadata.csv, which training reads


def test_delete_removes_the_image_and_every_row_of_it(tmp_path):
    folder = dataset(tmp_path / "ds", ["a.png", "b.png"], [("a.png", "one"), ("b.png", "x"), ("a.png", "two")])
    (folder / "a.txt").write_text("sidecar")
    assert files.delete_images(folder, ["a.png"]) == ["a.png"]
    assert not (folder / "a.png").exists() and not (folder / "a.txt").exists()
    assert read_csv_rows(folder / "metadata.csv") == [("b.png", "x")]
    for bad in ("metadata.csv", "../ds/b.png", "missing.png"):
        with pytest.raises(StudioError):
            files.delete_images(folder, [bad])
    assert (folder / "metadata.csv").is_file() and (folder / "b.png").is_file()


def test_remove_rows_takes_only_stale_rows(tmp_path):
    rows = [("b.png", "one"), ("gone.png", "x"), ("b.png", "two"), ("lost.png", "y")]
    folder = dataset(tmp_path / "ds", ["b.png"], rows)
    assert files.stale_rows(folder) == ["gone.png", "lost.png"]
    with pytest.raises(StudioError, match="b.png: no stale row to remove"):
        files.remove_rows(folder, ["b.png"])
    assert files.remove_rows(folder, ["gone.png"]) == ["gone.png"]
    assert files.remove_rows(folder) == ["lost.png"]
    assert read_csv_rows(folder / "metadata.csv") == [("b.png", "one"), ("b.png", "two")]  # others untouched


def test_rename_moves_the_caption_too(tmp_path):
    folder = dataset(tmp_path / "ds", ["a.png", "b.png"], [("a.png", "first"), ("b.png", "second")])
    assert files.rename_image(folder, "a.png", "my photo") == "my photo.png"
    assert read_csv_rows(folder / "metadata.csv") == [("my photo.png", "first"), ("b.png", "second")]
    for new, why in [("b.png", "already exists"), ("c.jpg", "ending in .png"), ("my photo.png", "already has")]:
        with pytest.raises(StudioError, match=why):
            files.rename_image(folder, "my photo.png", new)

    kohya = dataset(tmp_path / "kohya", ["k.png"])
    (kohya / "k.txt").write_text("a sidecar caption\n")
    files.rename_image(kohya, "k.png", "renamed.png")
    assert read_sidecar_captions(kohya) == {"renamed.png": "a sidecar caption"}


def test_conflicting_rows_are_a_problem_whose_fix_keeps_one_caption(tmp_path):
    folder = dataset(tmp_path / "ds", ["dup.png", "ok.png"],
                     [("dup.png", "red"), ("ok.png", "fine"), ("dup.png", "blue"), ("ok.png", "fine")])
    report = inspect_dataset(folder)
    assert [(i.file, i.fix) for i in report.issues] == [("dup.png", CAPTION)]  # identical rows are no conflict
    assert "2 rows of metadata.csv give it different captions ('red' / 'blue')" in report.problems[0]

    assert files.apply_fix(folder, CAPTION, "dup.png", "purple") == "Saved the caption of dup.png."
    assert read_csv_rows(folder / "metadata.csv") == [("dup.png", "purple"), ("ok.png", "fine"), ("ok.png", "fine")]
    assert inspect_dataset(folder).ok


def test_each_problem_has_its_fix(tmp_path):
    folder = dataset(tmp_path / "ds", ["ok.png", "nocap.png"], [("ok.png", "fine"), ("gone.png", "x")])
    (folder / "broken.png").write_bytes(b"not an image")
    image(folder / "tiny.png", size=(16, 16))
    (folder / "clip.gif").write_bytes(b"GIF89a")
    issues = {i.file: i.fix for i in inspect_dataset(folder).issues}
    assert issues == {"clip.gif": DELETE_FILE, "gone.png": REMOVE_ROW, "broken.png": DELETE_FILE,
                      "nocap.png": CAPTION, "tiny.png": DELETE_FILE}

    with pytest.raises(StudioError, match="caption for nocap.png is empty"):
        files.apply_fix(folder, CAPTION, "nocap.png", "  ")
    for name, fix in issues.items():
        files.apply_fix(folder, fix, name, "a caption")
    assert inspect_dataset(folder).ok and sorted(p.name for p in folder.iterdir()) == ["metadata.csv", "nocap.png",
                                                                                         "ok.png"]


def test_caption_table_writes_only_what_changed(tmp_path):
    folder = dataset(tmp_path / "ds", ["a.png", "b.png", "c.png"], [("b.png", "one"), ("a.png", "x"),
                                                                     ("b.png", "two")])
    assert files.save_caption_table(folder, [["a.png", "new"], ["b.png", "two"], ["c.png", ""]]) == 1
    assert read_csv_rows(folder / "metadata.csv") == [("b.png", "one"), ("a.png", "new"), ("b.png", "two")]


def test_copy_dataset_leaves_the_cache_and_takes_a_free_name(tmp_path):
    source = dataset(tmp_path / "demo" / "shapes", ["a.png"], [("a.png", "x")])
    (source / ".studio-cache").mkdir()
    (source / ".studio-cache" / "big.safetensors").write_bytes(b"0" * 100)
    first = files.copy_dataset(source, tmp_path / "datasets")
    second = files.copy_dataset(source, tmp_path / "datasets")
    assert (first.name, second.name) == ("shapes", "shapes-2")
    assert sorted(p.name for p in first.iterdir()) == ["a.png", "metadata.csv"]


# --- through the studio's API ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(demo, free_port, tmp_path_factory):
    """(client, studio) over a workspace of its own holding a copy of the session's demo (so nothing is rebuilt)."""
    root = tmp_path_factory.mktemp("files-workspace")
    shutil.copytree(demo.root, root / "demo")
    blocks, studio = build_app(root)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False, download_files=False), studio
    blocks.close()


def new_dataset(client, studio, name: str, names: list[str], rows: list[tuple[str, str]]) -> Path:
    status, _, name_box = client.predict(name, api_name="/create_dataset")
    assert status.startswith("✔") and name_box == "", status  # the box is ready for the next name
    return dataset(studio.workspace.datasets / name, names, rows)


def test_api_upload_keeps_names_with_spaces(app, tmp_path):
    client, studio = app
    client.predict("uploads", api_name="/create_dataset")
    image(tmp_path / "photo 2.png")
    image(tmp_path / "a:b.png", "blue")  # gradio_client sends it as ab.png; the CSV row still finds it
    write_csv_rows(tmp_path / "metadata.csv", [("photo 2.png", "a red square"), ("a:b.png", "a blue square")])
    status, picker, gallery, table, report, problems, picked = client.predict(
        "datasets/uploads", [handle_file(str(tmp_path / n)) for n in ("photo 2.png", "a:b.png", "metadata.csv")],
        api_name="/upload_files")
    assert "Added 3 file(s)" in status and "Took 2 caption(s)" in status
    assert report.startswith("✔") and "2 image(s)" in report and len(gallery) == 2
    folder = studio.workspace.datasets / "uploads"
    assert sorted(p.name for p in folder.glob("*.png")) == ["ab.png", "photo 2.png"]
    assert dict(read_csv_rows(folder / "metadata.csv")) == {"photo 2.png": "a red square", "ab.png": "a blue square"}
    assert [c[0] for c in picked["choices"]] == ["ab.png", "photo 2.png"]


def test_api_every_problem_is_fixed_by_its_fix(app):
    client, studio = app
    folder = new_dataset(client, studio, "fixes", ["ok.png", "nocap.png", "dup.png"],
                         [("ok.png", "fine"), ("gone.png", "x"), ("dup.png", "red"), ("dup.png", "blue")])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    gallery, _, report, problems, _ = client.predict("datasets/fixes", api_name="/show_dataset")
    assert "4 problem(s)" in report and len(gallery) == 3  # the unreadable image has no thumbnail
    rows = {row[0]: (row[1], row[2]) for row in problems["value"]["data"]}
    assert rows["broken.png"][0].startswith("cannot be read as an image") and "Delete" in rows["broken.png"][1]
    assert set(rows) == {"broken.png", "nocap.png", "dup.png", "gone.png"}

    status, *_ = client.predict("datasets/fixes", CAPTION, "nocap.png", "", api_name="/fix_problem")
    assert status.startswith("✖") and "is empty" in status
    for fix, name, caption in [(DELETE_FILE, "broken.png", ""), (REMOVE_ROW, "gone.png", ""),
                               (CAPTION, "nocap.png", "a red square"), (CAPTION, "dup.png", "purple")]:
        status, picker, _, _, report, problems, _ = client.predict("datasets/fixes", fix, name, caption,
                                                                   api_name="/fix_problem")
        assert status.startswith("✔"), status
    assert report.startswith("✔") and not problems.get("visible", True)
    assert read_csv_rows(folder / "metadata.csv") == [("ok.png", "fine"), ("dup.png", "purple"),
                                                      ("nocap.png", "a red square")]
    assert not (folder / "broken.png").exists()


def test_api_delete_rename_and_stale_rows(app):
    client, studio = app
    folder = new_dataset(client, studio, "manage", ["a.png", "b.png", "c.png"],
                         [("a.png", "one"), ("b.png", "two"), ("c.png", "three"), ("old.png", "x")])
    status, *_ = client.predict("datasets/manage", ["a.png"], api_name="/delete_images")
    assert status.startswith("✔ Deleted 1 image(s)") and not (folder / "a.png").exists()

    status, *_, name_box = client.predict("datasets/manage", ["b.png", "c.png"], "x", api_name="/rename_image")
    assert "Pick exactly one image" in status and name_box == {"__type__": "update"}  # refused: left as typed
    status, *_, picked, name_box = client.predict("datasets/manage", ["b.png"], "beach day", api_name="/rename_image")
    assert "Renamed b.png to beach day.png" in status and name_box == ""
    assert [c[0] for c in picked["choices"]] == ["beach day.png", "c.png"]

    status, *_ = client.predict("datasets/manage", api_name="/remove_stale_rows")
    assert "Removed 1 caption row(s)" in status and "old.png" in status
    assert read_csv_rows(folder / "metadata.csv") == [("beach day.png", "two"), ("c.png", "three")]
    status, *_ = client.predict("datasets/manage", api_name="/remove_stale_rows")
    assert "nothing to remove" in status


def test_api_demo_dataset_is_copied_on_first_edit(app):
    client, studio = app
    demo_folder = studio.demo.images
    before = {p.name: p.read_bytes() for p in demo_folder.iterdir() if p.is_file()}
    gallery, *_ = client.predict("demo/datasets/demo-shapes", api_name="/show_dataset")
    assert len(gallery) == len(list(demo_folder.glob("*.png")))  # and showing it wrote nothing there:
    assert sorted(p.name for p in demo_folder.iterdir()) == sorted(before)
    first = sorted(p.name for p in demo_folder.glob("*.png"))[0]

    status, *_ = client.predict("demo/datasets/demo-shapes", [first], sorted(before)[1], api_name="/rename_image")
    assert status.startswith("✖") and not (studio.workspace.datasets / "demo-shapes").exists()  # a failed edit: no copy

    status, picker, *_ = client.predict("demo/datasets/demo-shapes", [first], "renamed", api_name="/rename_image")
    assert "went to a copy, datasets/demo-shapes" in status and picker["value"] == "datasets/demo-shapes"
    copy = studio.workspace.datasets / "demo-shapes"
    assert (copy / "renamed.png").is_file() and not (copy / first).exists()
    assert {p.name: p.read_bytes() for p in demo_folder.iterdir() if p.is_file()} == before  # the demo as built


def test_clicking_a_problem_opens_its_fix_and_a_thumbnail_picks_it(app):
    import gradio as gr

    from studio.ui.dataset_edit import pick_image, select_problem
    from studio.ui.dataset_view import FIX_LABELS

    client, studio = app
    new_dataset(client, studio, "clicks", ["dup.png"], [("dup.png", "red"), ("dup.png", "blue")])
    row = ["dup.png", "2 rows of metadata.csv give it different captions", FIX_LABELS[CAPTION]]
    panel, question, caption, file, fix, button = select_problem(
        studio, "datasets/clicks", gr.SelectData(None, {"index": [0, 2], "value": row[2], "row_value": row}))
    assert panel["visible"] and "The caption of **dup.png**" in question
    assert caption["visible"] and caption["value"] == "blue"  # the caption training would have used, to edit
    assert (file, fix, button["value"]) == ("dup.png", CAPTION, "Save the caption")
    assert select_problem(studio, "datasets/clicks", gr.SelectData(None, {"index": [0, 0], "value": "",
                                                                           "row_value": ["", "", ""]}))[0] == gr.skip()

    shown = ["a.png", "b.png"]
    assert pick_image(["a.png"], shown, gr.SelectData(None, {"index": 1, "value": {}})) == ["a.png", "b.png"]
    assert pick_image(["b.png"], shown, gr.SelectData(None, {"index": 1, "value": {}})) == ["b.png"]


def test_file_actions_and_auto_label_answer_beside_their_buttons(tmp_path):
    """Delete, Rename, Remove rows and Auto-label write their message (and auto-label its progress) in a line inside
    the section of the button pressed, not at the top of the tab."""
    blocks, _ = build_app(tmp_path, with_demo=False)
    by_api = {fn.api_name: fn for fn in blocks.fns.values()}
    for api_name, line in [("delete_images", "manage-files-status"), ("rename_image", "manage-files-status"),
                           ("remove_stale_rows", "manage-files-status"), ("auto_label", "auto-label-status")]:
        fn = by_api[api_name]
        status, button = fn.outputs[0], blocks.blocks[fn.targets[0][0]]
        enclosing = [button.parent, button.parent.parent]
        assert status.elem_id == line and status.parent in enclosing, api_name
    assert [c.elem_id for c in by_api["auto_label"].show_progress_on] == ["auto-label-status"]
