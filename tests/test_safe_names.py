"""Nothing is deleted, written or read by a name it should not reach: the one path guard (studio.safe_names), and
every API endpoint of the studio walked with hostile names — nothing outside the workspace (and nothing in it) may
change, no outside file's content may come back, and every answer is our message, never an exception."""

import hashlib
import os
import re
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from studio.data.captions import write_csv_rows
from studio.data.dataset_files import STORED_NAME_BYTES
from studio.errors import StudioError
from studio.run_index import RunIndex
from studio.safe_names import cache_key, inside, workspace_path
from studio.ui.app import build_app, launch
from studio.ui.dataset_tab import add_files

SECRET = "SECRET-outside-caption"
RAW_ERRORS = ("Traceback", "Errno", "null byte", "Error:", "File \"", "NoneType", "object has no attribute")
# Parameters that are paths the user types on purpose and that may lie outside the workspace: base models, the
# folder a LoRA is installed into, a file to self-test. They are not names of workspace things.
USER_PATHS = {"base", "base_model", "lora_dir", "path", "clip_model", "blip_model", "wd14_model", "vlm_model"}
NAME_PARAMS_WITH_DEFAULTS = {"adapter", "checkpoints", "run", "config"}  # names, though gradio gives a default
BENIGN = {"operation": "add", "tag": "t", "new_tag": "", "search": "", "fix": "delete_file", "caption": "",
          "offset": 1, "message": "hi", "negative": "", "trigger": "", "key": "lora_rank", "strength": 1.0,
          "files": [], "table": {"headers": ["filename", "caption"], "data": [], "metadata": None}}
SKIPPED_ENDPOINTS = {"/auto_label"}  # its dataset goes through the same `editing` as every edit, checked below


def _image(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (64, 64), colour).save(path)
    return path


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A workspace with one dataset, one run and one config, links from it to an outside folder that looks like a
    dataset and a run (captions and config holding SECRET), and that outside folder."""
    top = tmp_path_factory.mktemp("hostile")
    victim = top / "outside" / "victim"
    victim.mkdir(parents=True)
    _image(victim / "a.png")
    write_csv_rows(victim / "metadata.csv", [("a.png", SECRET)])
    (victim / "config.yaml").write_text(f"task_type: image-generation\nmodel_family: sd15\n# {SECRET}\n")
    ws = top / "ws"
    target = ws / "datasets" / "target"
    target.mkdir(parents=True)
    _image(target / "a.png"), _image(target / "b.png", (30, 30, 200))
    write_csv_rows(target / "metadata.csv", [("a.png", "red"), ("b.png", "blue")])
    run = ws / "runs" / "kept"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task_type: image-generation\nmodel_family: sd15\n")
    (ws / "configs").mkdir()
    (ws / "configs" / "saved.yaml").write_text("preset: style\n")
    os.symlink(victim, ws / "datasets" / "linked")
    os.symlink(victim, ws / "runs" / "linked")
    os.symlink(victim / "config.yaml", ws / "configs" / "linked.yaml")
    tagged = ws / "datasets" / "tagged"
    tagged.mkdir()
    _image(tagged / "a.png")
    os.symlink(victim / "metadata.csv", tagged / "metadata.csv")
    return top


@pytest.fixture(scope="module")
def app(layout, free_port):
    blocks, studio = build_app(layout / "ws", with_demo=False)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(url, verbose=False, download_files=False), studio
    blocks.close()


def hostile_values(top: Path) -> list[str]:
    return [str(top / "outside" / "victim"), "../../outside/victim", "../datasets/target", "datasets/linked",
            "linked", str(top / "ws" / "datasets" / "target"), "a\x00b", "x" * 3000]


def snapshot(top: Path) -> dict[str, tuple]:
    """Every entry under `top` (links not followed) with what it is: the link's target, the file's hash."""
    seen = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(top))
            if rel.startswith(("ws/.cache", "ws/studio.db")):
                continue  # the studio's own caches and index
            if path.is_symlink():
                seen[rel] = ("link", os.readlink(path))
            elif path.is_file():
                seen[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                seen[rel] = ("dir",)
    return seen


def answer_of(client: Client, job, args: list, api_name: str) -> str:
    """A submitted call's answer as text (a gr.Error's message, too). A call the client dropped under load (its
    stream cancelled: no answer at all) is made again, alone."""
    try:
        return repr(job.result(timeout=120))
    except AppError as exc:
        return f"refused: {exc}"
    except CancelledError:
        return answer_of(client, client.submit(*args, api_name=api_name), args, api_name)


def _arguments(params: list[dict], top: Path) -> tuple[list, list[int]]:
    """Benign arguments for an endpoint, and the positions of its parameters that take a name."""
    args, names = [], []
    for i, p in enumerate(params):
        pname, ptype = p["parameter_name"], p["python_type"]["type"]
        if pname in BENIGN:
            args.append(BENIGN[pname])
        elif pname in USER_PATHS:
            args.append("")
        elif p["parameter_has_default"] and pname not in NAME_PARAMS_WITH_DEFAULTS:
            args.append(p["parameter_default"])
        else:
            args.append([] if ptype.startswith("list") else "")
            names.append(i)
    return args, names


def _hostile_arg(ptype: str, pname: str, value: str, top: Path):
    if pname in ("text", "config_yaml"):  # a config whose paths leave the workspace
        return f"base_model: some/model\noutput_dir: {value}\ntrain_data_dir: {top / 'outside' / 'victim'}\n"
    return [value] if ptype.startswith("list") else value


def test_every_endpoint_refuses_hostile_names(app, layout, capfd):
    client, _ = app
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/delete_run", "/check_dataset", "/rename_image", "/upload_files", "/tag_frequencies"} <= set(endpoints)
    before = snapshot(layout)
    calls = []  # (where, job): submitted together (gradio runs different endpoints side by side), then read
    for api_name, info in endpoints.items():
        if api_name in SKIPPED_ENDPOINTS:
            continue
        args, names = _arguments(info["parameters"], layout)
        for i in names:
            p = info["parameters"][i]
            for value in hostile_values(layout):
                hostile = list(args)
                hostile[i] = _hostile_arg(p["python_type"]["type"], p["parameter_name"], value, layout)
                calls.append((f"{api_name}({p['parameter_name']}={value[:40]!r})", hostile, api_name,
                              client.submit(*hostile, api_name=api_name)))
    assert len(calls) > 200
    for where, args, api_name, job in calls:
        answer = answer_of(client, job, args, api_name)
        assert SECRET not in answer, f"{where} read outside the workspace: {answer[:300]}"
        assert not any(raw in answer for raw in RAW_ERRORS), f"{where} answered {answer[:300]}"
    assert snapshot(layout) == before
    raised = set(re.findall(r"(?m)^(\w[\w.]*(?:Error|Exception)):", capfd.readouterr().err))
    assert raised <= {"gradio.exceptions.Error"}, raised  # gradio logs our gr.Error; anything else is a bug


def test_delete_run_deletes_exactly_that_run(app, layout, tmp_path):
    client, studio = app
    for name in ("doomed", "neighbour"):
        (studio.workspace.runs / name).mkdir()
        (studio.workspace.runs / name / "config.yaml").write_text("task_type: image-generation\n")
    (studio.workspace.runs / "not-a-run").mkdir()  # no config.yaml: not a run of this workspace
    assert client.predict("doomed", api_name="/delete_run") == "Deleted 'doomed'."
    assert not (studio.workspace.runs / "doomed").exists() and (studio.workspace.runs / "neighbour").is_dir()
    for name, expected in [("doomed", "There is no run called 'doomed'"), ("not-a-run", "no run called"),
                           ("linked", "is a link to"), ("a\x00b", "control character")]:
        with pytest.raises(AppError, match=expected):
            client.predict(name, api_name="/delete_run")
    assert (studio.workspace.runs / "not-a-run").is_dir() and (layout / "outside" / "victim" / "a.png").is_file()


def test_links_leaving_the_workspace_are_not_offered(app, layout):
    _, studio = app
    names = {r.name for r in RunIndex(layout / "ws").list()}
    assert "kept" in names and "linked" not in names  # its config.yaml is not read through the link
    assert "linked" not in studio.run_choices() and "datasets/linked" not in dict(studio.dataset_choices()).values()
    assert "datasets/target" in dict(studio.dataset_choices()).values()


def test_tag_editor_refuses_a_metadata_link_leaving_the_workspace(app, layout):
    client, studio = app
    status, table = client.predict("datasets/tagged", "", api_name="/tag_frequencies")
    assert status.startswith("✖") and "outside the workspace" in status and SECRET not in repr(table)
    status, *_ = client.predict("datasets/tagged", "add", "new", "", "", api_name="/tags_bulk_edit")
    assert status.startswith("✖") and "Copy the file into the dataset" in status
    link = studio.workspace.datasets / "tagged" / "metadata.csv"
    assert link.is_symlink() and SECRET in link.resolve().read_text()  # still a link; the outside file as it was


def test_uploads_and_renames_with_long_or_pathlike_names(app, layout, tmp_path):
    client, studio = app
    source = _image(tmp_path / "upload.png")
    hostile = ["x" * 3000 + ".png", "../../outside/victim/evil.png"]
    # The upload handler with the file names a browser sends (the client names files after their path).
    status, *_ = add_files(studio, "datasets/target", [{"path": str(source), "orig_name": name} for name in hostile])
    assert status.startswith("✔"), status
    target = studio.workspace.datasets / "target"
    stored = sorted(p.name for p in target.glob("*.png"))
    assert "evil.png" in stored and not (layout / "outside" / "victim" / "evil.png").exists()
    long = next(name for name in stored if name.startswith("xxx"))
    assert len(long.encode()) <= STORED_NAME_BYTES and long.endswith(".png")
    status, *_ = client.predict("datasets/target", ["evil.png"], "y" * 3000, api_name="/rename_image")
    assert status.startswith("✖") and "3000 bytes" in status and (target / "evil.png").is_file()


def test_health_check_cache_is_keyed_by_a_hash(app, layout):
    client, studio = app
    report, *_ = client.predict("datasets/target", "", api_name="/check_dataset")
    assert "a.png" in report or "2 image" in report, report
    cache = studio.workspace.root / ".cache" / "health"
    assert [p.name for p in cache.iterdir()] == [cache_key(studio.workspace.datasets / "target")]
    assert (studio.workspace.datasets / "target" / "a.png").is_file()


@pytest.mark.parametrize("name, expected", [
    ("/etc", "absolute path"), ("../x", "is a path"), ("..", "names no file"), ("", "names no file"),
    ("a\nb", "control character"), ("x" * 256, "256 bytes"), ("é" * 128, "256 bytes"), ("CON", "reserved"),
    ("nul.txt", "reserved"), (".studio-cache", "reserved"), ("C:\\x", "absolute path"), ("a\\b", "is a path"),
])
def test_the_guard_refuses(tmp_path, name, expected):
    with pytest.raises(StudioError, match=expected):
        workspace_path(tmp_path, "run", name)


def test_the_guard_follows_links_at_every_level(tmp_path):
    (tmp_path / "ws" / "runs").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "out", tmp_path / "ws" / "runs" / "away")
    os.symlink(tmp_path / "ws" / "runs", tmp_path / "ws" / "runs" / "here")  # a link that stays inside is fine
    assert workspace_path(tmp_path / "ws", "run", "here") == (tmp_path / "ws" / "runs").resolve() / "here"
    assert workspace_path(tmp_path / "ws", "config", "c.yaml") == (tmp_path / "ws").resolve() / "configs" / "c.yaml"
    with pytest.raises(StudioError, match="is a link to"):
        workspace_path(tmp_path / "ws", "run", "away")
    with pytest.raises(StudioError, match="is a link to"):
        inside(tmp_path / "ws", "runs/away", "file", parts=2)
    os.symlink(tmp_path / "out", tmp_path / "ws" / "configs")  # a level above the name leaves the workspace
    with pytest.raises(StudioError, match="workspace folder 'configs' is a link to"):
        workspace_path(tmp_path / "ws", "config", "c")
