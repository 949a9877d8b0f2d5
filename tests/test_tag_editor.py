"""The tag editor: bulk add / remove / replace on all images or a search's selection, trigger word first, sort by
frequency, on metadata.csv and on .txt sidecar datasets, undo of the last bulk edit (kept on disk), and the same
through the studio's API."""

import pytest
from gradio_client import Client
from PIL import Image

from studio.data.captions import read_captions, write_csv_captions, write_sidecar_captions
from studio.data.tag_editor import bulk_edit, tag_table, undo_last_edit
from studio.errors import StudioError
from studio.ui.app import build_app, launch

CAPTIONS = {
    "a.png": "1girl, red hair, smile",
    "b.png": "1girl, blue hair, blurry",
    "c.png": "landscape, blurry, sky",
    "d.png": "1girl, red hair, sky",
}


def make_dataset(folder, captions=CAPTIONS, sidecars=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name in captions:
        Image.new("RGB", (8, 8), "gray").save(folder / name)
    if sidecars:
        write_sidecar_captions(folder, captions)
    else:
        write_csv_captions(folder / "metadata.csv", captions)
    return folder


def test_add_remove_replace_on_every_image(tmp_path):
    folder = make_dataset(tmp_path / "ds")
    result = bulk_edit(folder, "add", "masterpiece, sky")
    assert (result.selected, result.changed, result.where) == (4, 4, "metadata.csv")
    captions = read_captions(folder)
    assert captions["a.png"] == "1girl, red hair, smile, masterpiece, sky"
    assert captions["c.png"] == "landscape, blurry, sky, masterpiece"  # an existing tag is not added twice

    bulk_edit(folder, "remove", "blurry")
    assert not any("blurry" in c for c in read_captions(folder).values())

    bulk_edit(folder, "replace", "red hair", "long hair, red hair color")
    captions = read_captions(folder)
    assert captions["d.png"] == "1girl, long hair, red hair color, sky, masterpiece"
    assert captions["b.png"] == "1girl, blue hair, masterpiece, sky"


def test_search_selects_images_by_tags(tmp_path):
    folder = make_dataset(tmp_path / "ds")
    result = bulk_edit(folder, "add", "solo", search="1girl, -blurry")
    assert (result.selected, result.changed) == (2, 2)
    captions = read_captions(folder)
    assert [n for n, c in sorted(captions.items()) if c.endswith("solo")] == ["a.png", "d.png"]
    assert "matching '1girl, -blurry'" in result.summary()
    assert tag_table(folder, search="sky") == [("sky", 2), ("1girl", 1), ("blurry", 1), ("landscape", 1),
                                               ("red hair", 1), ("solo", 1)]


def test_trigger_first_and_sort_by_frequency(tmp_path):
    folder = make_dataset(tmp_path / "ds")
    bulk_edit(folder, "trigger", "sks")
    assert all(c.startswith("sks, ") for c in read_captions(folder).values())
    bulk_edit(folder, "trigger", "1girl", search="1girl")  # an existing tag moves to the front, not repeated
    assert read_captions(folder)["a.png"] == "1girl, sks, red hair, smile"

    bulk_edit(folder, "sort")
    captions = read_captions(folder)
    # sks 4, 1girl 3, then red hair / blurry / sky 2 each (their order kept), then the tags used once
    assert captions["d.png"] == "sks, 1girl, red hair, sky"
    assert captions["c.png"] == "sks, blurry, sky, landscape"
    assert tag_table(folder)[:2] == [("sks", 4), ("1girl", 3)]


def test_sidecar_dataset_is_edited_in_its_txt_files(tmp_path):
    folder = make_dataset(tmp_path / "ds", sidecars=True)
    Image.new("RGB", (8, 8)).save(folder / "e.png")  # no caption yet: adding gives it one
    result = bulk_edit(folder, "add", "photo")
    assert result.where == ".txt captions" and result.changed == 5
    assert not (folder / "metadata.csv").exists()
    assert (folder / "e.txt").read_text(encoding="utf-8").strip() == "photo"
    assert (folder / "a.txt").read_text(encoding="utf-8").strip() == "1girl, red hair, smile, photo"

    message = undo_last_edit(folder)
    assert "on 5 caption(s)" in message
    assert not (folder / "e.txt").exists()  # the sidecar the edit created is gone again
    assert read_captions(folder) == CAPTIONS


def test_undo_restores_the_last_edit_and_survives_a_reload(tmp_path):
    folder = make_dataset(tmp_path / "ds")
    bulk_edit(folder, "remove", "1girl")
    bulk_edit(folder, "add", "sky", search="landscape")  # changes nothing: the undo of the removal stays
    assert (folder / ".studio-cache" / "tag-edit-undo.json").is_file()

    captions = read_captions(folder)
    captions["a.png"] = "hand written"
    write_csv_captions(folder / "metadata.csv", captions)  # an edit by hand after the bulk edit

    message = undo_last_edit(folder)  # a fresh call: everything it needs is on disk
    restored = read_captions(folder)
    assert restored["b.png"] == CAPTIONS["b.png"] and restored["d.png"] == CAPTIONS["d.png"]
    assert restored["a.png"] == "hand written" and "Kept 1 caption(s) changed since that edit: a.png" in message
    with pytest.raises(StudioError, match="no bulk tag edit to undo"):
        undo_last_edit(folder)


def test_user_mistakes_are_clear_errors(tmp_path):
    folder = make_dataset(tmp_path / "ds")
    with pytest.raises(StudioError, match="Type the tag\\(s\\) to add first"):
        bulk_edit(folder, "add", " , ")
    with pytest.raises(StudioError, match="Give one tag as the tag to replace"):
        bulk_edit(folder, "replace", "a, b", "c")
    with pytest.raises(StudioError, match="Unknown tag edit 'rename'"):
        bulk_edit(folder, "rename", "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="holds no images"):
        bulk_edit(tmp_path / "empty", "add", "a")
    assert read_captions(folder) == CAPTIONS


@pytest.fixture(scope="module")
def client(tmp_path_factory, free_port):
    """A gradio_client Client and the Studio, for the studio over a fresh workspace (no demo models needed)."""
    app, studio = build_app(tmp_path_factory.mktemp("workspace"), with_demo=False)
    _, url, _ = launch(app, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False), studio
    app.close()


def test_tag_editor_in_the_dataset_tab(client):
    client, studio = client
    folder = make_dataset(studio.workspace.datasets / "tag-edits")
    status, table, _ = client.predict("datasets/tag-edits", "add", "solo", "", "1girl", api_name="/tags_bulk_edit")
    assert status.startswith("✔") and "changed 3 of 3" in status
    assert ["solo", 3] in table["data"] and ["1girl", 3] in table["data"]
    assert read_captions(folder)["a.png"] == "1girl, red hair, smile, solo"

    status, table, _ = client.predict("datasets/tag-edits", "replace", "sky", "", "", api_name="/tags_bulk_edit")
    assert status.startswith("✖") and "Type what to replace it with" in status  # a message, no traceback

    status, table = client.predict("datasets/tag-edits", "", api_name="/tags_undo")
    assert status.startswith("✔") and read_captions(folder) == CAPTIONS
    assert ["1girl", 3] in table["data"] and "solo" not in [row[0] for row in table["data"]]
    status, table = client.predict("datasets/tag-edits", "-1girl", api_name="/tag_frequencies")
    assert sorted(map(tuple, table["data"])) == [("blurry", 1), ("landscape", 1), ("sky", 1)]
