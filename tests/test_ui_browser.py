"""The studio in a real browser: headless Debian Chromium driven by playwright (no browser download). Visits every
tab, checks its main controls, runs the demo through it, and at 1400×1000 and 1024×768 saves a screenshot of each tab
and checks that nothing spills out of its box or the window.

Screenshots go to $STUDIO_SCREENSHOTS if set, else to the test's temporary folder (printed with -s). With
STUDIO_UPDATE_README_SHOTS=1 it also rewrites the README's screenshots in docs/screenshots/."""

import os
import re
import shutil
from pathlib import Path

import pytest

from studio.config import load_preset

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

VIEWPORTS = [(1400, 1000), (1024, 768)]
README_SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
README_SHOT_LIMIT = 300_000  # bytes; a larger capture is reduced to a 256-colour palette

# Every visible element of the page: its content must fit its box unless the box scrolls (overflow-x auto/scroll, as
# tables and the code editor do) or ends in an ellipsis, and it must lie inside the window unless an ancestor clips
# or scrolls it. Returns one line per problem.
OVERFLOW_JS = """() => {
  // Gradio's own chrome: an accordion's rotated arrow, the icon buttons at a block's corner, screen-reader-only text
  const ALLOWED = "button.label-wrap, .icon-button-wrapper, .visually-hidden";
  const SKIPPED = ["INPUT", "TEXTAREA", "SELECT", "OPTION", "IMG", "CANVAS", "VIDEO"];  // they scroll or scale inside
  const width = document.documentElement.clientWidth;
  const name = (el) => {
    const parts = [];
    for (let e = el; e && parts.length < 4 && !e.classList.contains("gradio-container"); e = e.parentElement) {
      const classes = [...e.classList].filter((c) => !c.startsWith("svelte-")).slice(0, 2);
      parts.unshift(e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + classes.map((c) => "." + c).join(""));
      if (e.id) break;
    }
    return parts.join(" > ");
  };
  const problems = [];
  if (document.documentElement.scrollWidth > width + 1) {
    problems.push(`the page scrolls sideways: ${document.documentElement.scrollWidth}px in a ${width}px window`);
  }
  for (const el of document.querySelectorAll(".gradio-container *")) {
    if (el instanceof SVGElement || SKIPPED.includes(el.tagName) || el.closest(ALLOWED)) continue;
    if (!el.checkVisibility({ visibilityProperty: true, opacityProperty: true })) continue;
    const box = el.getBoundingClientRect();
    if (box.width < 1 || box.height < 1 || el.clientWidth <= 1 && el.clientHeight <= 1) continue;
    const style = getComputedStyle(el);
    const text = (el.innerText || "").trim().slice(0, 40).replace(/\\s+/g, " ");
    const scrolls = ["auto", "scroll"].includes(style.overflowX);
    if (el.clientWidth > 1 && el.scrollWidth > el.clientWidth + 1 && !scrolls && style.textOverflow !== "ellipsis") {
      problems.push(`${name(el)} [${text}]: content ${el.scrollWidth}px wide in a ${el.clientWidth}px box ` +
                    `(overflow-x: ${style.overflowX})`);
    }
    let clipped = false;
    for (let e = el.parentElement; e && e !== document.body && !clipped; e = e.parentElement) {
      clipped = getComputedStyle(e).overflowX !== "visible";
    }
    if (!clipped && style.position !== "fixed" && (box.right > width + 1 || box.left < -1)) {
      problems.push(`${name(el)} [${text}]: spans x ${Math.round(box.left)}..${Math.round(box.right)} ` +
                    `in a ${width}px window`);
    }
  }
  return problems;
}"""

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` "
                                         "(.ci/run does); playwright must not download a browser")]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")


@pytest.fixture(scope="module")
def url(demo, free_port):
    import torch

    from studio.ui.app import build_app, launch

    # On a 2-core machine Chromium's rendering and two torch threads oversubscribe the CPU, and torch's thread
    # barriers then stall a training step for seconds; one torch thread keeps the demo run at its usual speed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    blocks, studio = build_app(demo.root.parent)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    studio.jobs.stop()
    studio.jobs.wait(30)
    blocks.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as pw:  # playwright gives the browser a fresh temporary profile
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(url)
        page.get_by_text("Go left to right").wait_for()
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


def open_tab(page, name):
    page.get_by_role("tab", name=name, exact=True).click()


def check_layout(page, shots, name, editor=None):
    """Screenshot the page (as it shows the current tab) at each size in VIEWPORTS, and fail if anything overflows.
    `editor`: a code editor to scroll into view first (CodeMirror measures wrapped lines only when on screen)."""
    problems = []
    for width, height in VIEWPORTS:
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(400)  # relayout
        if editor:
            page.locator(editor).scroll_into_view_if_needed()
            page.wait_for_timeout(200)
        page.screenshot(path=str(shots / f"{name}-{width}x{height}.png"), full_page=True)
        problems += [f"{width}×{height}: {p}" for p in page.evaluate(OVERFLOW_JS)]
    page.set_viewport_size({"width": VIEWPORTS[0][0], "height": VIEWPORTS[0][1]})
    page.wait_for_timeout(200)
    assert not problems, f"{name}: {len(problems)} element(s) overflow:\n" + "\n".join(problems[:20])


def readme_shot(page, name, *selectors):
    """With STUDIO_UPDATE_README_SHOTS=1: docs/screenshots/<name>.png, the part of the page that holds `selectors`
    (at 1400×1000, the size the test runs at), kept under README_SHOT_LIMIT."""
    if os.environ.get("STUDIO_UPDATE_README_SHOTS") != "1":
        return
    from PIL import Image

    clip = page.evaluate("""(selectors) => {
        const boxes = selectors.map((s) => document.querySelector(s).getBoundingClientRect());
        const left = Math.min(...boxes.map((b) => b.left)), top = Math.min(...boxes.map((b) => b.top));
        const right = Math.max(...boxes.map((b) => b.right)), bottom = Math.max(...boxes.map((b) => b.bottom));
        return {x: left + window.scrollX - 8, y: top + window.scrollY - 8, width: right - left + 16,
                height: bottom - top + 16};
    }""", list(selectors))
    README_SHOTS.mkdir(parents=True, exist_ok=True)
    path = README_SHOTS / f"{name}.png"
    page.screenshot(path=str(path), clip=clip, full_page=True)
    if path.stat().st_size > README_SHOT_LIMIT:
        Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    assert path.stat().st_size <= README_SHOT_LIMIT, f"{path} is {path.stat().st_size} bytes"


def pick(page, elem_id, text):
    """Choose `text` in a gradio Dropdown by typing it and taking the matching option."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(text)
    page.get_by_role("option", name=text).first.click()


def click_tile(page, image, rows, columns, row, column):
    """Click the middle of a tile of the strength sweep grid shown in `image` (square tiles, row 0 at the top): the
    grid is GAP + columns × (tile + GAP) wide, and the browser shows it scaled down (never up), centred in its box."""
    from studio.preview.sweep_grid import GAP

    width, height = image.evaluate("(img) => [img.naturalWidth, img.naturalHeight]")
    box = image.bounding_box()
    tile = (width - GAP) / columns - GAP
    x, y = GAP + column * (tile + GAP) + tile / 2, GAP + row * (height - GAP) / rows + tile / 2
    scale = min(box["width"] / width, box["height"] / height, 1)
    image.click(position={"x": (box["width"] - width * scale) / 2 + x * scale,
                          "y": (box["height"] - height * scale) / 2 + y * scale})


def test_every_tab(page, shots, demo):
    from studio.run_adapters import step_of

    # --- Dataset: the demo's image dataset is picked and shown on load: thumbnails, captions, the validation report
    open_tab(page, "Dataset")
    assert page.locator("#dataset-picker input").input_value() == "demo-shapes (demo)"
    page.locator("#dataset-gallery img").first.wait_for()
    assert page.locator("#dataset-gallery img").count() >= 8
    page.locator("#dataset-report").get_by_text("ready to train").wait_for()
    for control in ("#dataset-picker", "#dataset-upload", "#caption-table", "#save-captions", "#auto-label"):
        assert page.locator(control).is_visible(), control
    # the report sits right under the picker; the refresh button is a small one beside it
    assert page.locator("#dataset-report").bounding_box()["y"] < page.locator("#dataset-upload").bounding_box()["y"]
    refresh = page.locator("#dataset-picker").locator("xpath=ancestor::div[contains(@class, 'row')][1]//button")
    box = refresh.first.bounding_box()
    assert box["height"] < 45 and box["width"] < 130, box
    # a text dataset: its samples and report; no image gallery, caption saving or auto-labelling
    pick(page, "dataset-picker", "demo-chat (demo)")
    page.locator("#dataset-report").get_by_text("text sample(s)").wait_for()
    page.locator("#dataset-gallery").wait_for(state="hidden")
    for control in ("#save-captions", "#auto-label"):
        assert not page.locator(control).is_visible(), control
    assert page.locator("#caption-table").is_visible()
    pick(page, "dataset-picker", "demo-shapes (demo)")
    page.locator("#dataset-gallery img").first.wait_for()
    page.locator("#dataset-report").get_by_text("ready to train").wait_for()
    assert page.locator("#save-captions").is_visible() and page.locator("#auto-label").is_visible()
    check_layout(page, shots, "1-dataset")

    # --- Config: hardware, preset, fill → YAML with reasons and a memory estimate
    open_tab(page, "Config")
    page.locator("#hardware").get_by_text("Hardware:").wait_for()
    assert page.locator("#preset-picker input").input_value().startswith("Demo: tiny SD")
    page.locator("#fill-config").click()
    page.locator("#config-status").get_by_text("Filled from the demo-image preset").wait_for()
    assert "preset: demo-image" in page.locator("#config-yaml").inner_text()
    page.locator("#memory-estimate").get_by_text("Memory plan").wait_for()
    run_name = page.locator("#run-name textarea, #run-name input").first.input_value()
    assert run_name.startswith("demo-image-")
    page.locator("#config-reasons").get_by_text("mixed_precision").first.wait_for()
    check_layout(page, shots, "2-config", editor="#config-yaml")
    # key names in "why these values" stay on one line; the YAML wraps instead of running off to the right
    keys = page.locator("#config-reasons .body-cell[data-col='0'] span").evaluate_all(
        "(spans) => spans.map((s) => [s.innerText, s.getClientRects().length, s.offsetHeight,"
        " parseFloat(getComputedStyle(s).fontSize)])")
    assert keys and all(rects == 1 and height < 2 * font for _, rects, height, font in keys), keys
    for width, height in VIEWPORTS:  # every column of "why" in view, none scrolled off to the side
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(300)
        table = page.locator("#config-reasons .virtual-table-viewport").evaluate(
            "(e) => [e.scrollWidth, e.clientWidth]")
        assert table[0] <= table[1] + 1, (width, table)
    page.set_viewport_size({"width": VIEWPORTS[0][0], "height": VIEWPORTS[0][1]})
    scroller = page.locator("#config-yaml .cm-scroller").evaluate("(e) => [e.scrollWidth, e.clientWidth]")
    assert scroller[0] <= scroller[1] + 1, scroller
    page.locator("#config-yaml").scroll_into_view_if_needed()
    readme_shot(page, "config", "#config-yaml", "#memory-estimate", "#config-reasons")

    # --- Train: start the demo run; progress, loss plot and samples update from the timer
    open_tab(page, "Train")
    page.locator("#start-training").click()
    page.locator("#train-status").get_by_text("Finished").wait_for(timeout=90_000)
    steps = load_preset("demo-image")["max_train_steps"]
    assert f"step {steps}/{steps}" in page.locator("#train-progress").inner_text()
    page.locator("#train-samples img").first.wait_for()
    assert page.locator("#train-samples img").first.evaluate("(img) => getComputedStyle(img).objectFit") == "contain"
    assert "[done]" in page.locator("#train-log textarea").input_value()
    # the log follows its end: its last line is in view
    page.wait_for_function("""() => { const log = document.querySelector('#train-log textarea');
        return log.scrollHeight > log.clientHeight && log.scrollTop + log.clientHeight >= log.scrollHeight - 1; }""")
    page.wait_for_timeout(500)  # let the plot draw
    check_layout(page, shots, "3-train")
    readme_shot(page, "train", "#train-status", "#train-progress", "#loss-plot", "#train-samples", "#train-log")
    # the Runs table lists the run, and a click on its row selects it
    runs = page.locator("#train-runs-table")
    row_of = ("(name) => [...document.querySelectorAll('#train-runs-table .body-cell')]"
              ".some((cell) => cell.innerText.trim() === name)")
    page.wait_for_function(row_of, arg=run_name)
    assert "done" in runs.inner_text() and "sd15" in runs.inner_text()
    runs.locator(".body-cell[data-col='0']").filter(has_text=run_name).first.click()
    selected = page.locator("#train-selected-run textarea, #train-selected-run input").first
    page.wait_for_function("(name) => document.querySelector('#train-selected-run textarea, #train-selected-run "
                           "input').value === name", arg=run_name)
    assert selected.input_value() == run_name
    # queueing the same config again: it gets a fresh name; the last message is cleared while the request is pending
    held = []
    page.route("**/queue/join**", lambda route: held.append(route))
    page.locator("#queue-training").click()
    page.wait_for_timeout(300)
    pending = page.locator("#train-action").inner_text()
    page.unroute("**/queue/join**")  # (releases the held request)
    assert held and "is taken" not in pending, pending
    page.locator("#train-action").get_by_text("is taken, so this run is").wait_for()
    again = re.search(r"this run is '([^']+)'", page.locator("#train-action").inner_text()).group(1)
    assert again != run_name
    page.locator("#train-status").get_by_text(f"Finished {again}").wait_for(timeout=90_000)
    page.wait_for_function(row_of, arg=again)
    check_layout(page, shots, "3-train-runs")

    # --- Preview: the new run's adapters are offered (the final one and those saved along the way); generate
    open_tab(page, "Preview")
    pick(page, "preview-adapter-1", f"{run_name} · final")
    assert "tiny-sd15" in page.locator("#preview-base input").input_value()
    page.locator("#preview-generate").click()
    page.locator("#preview-status").get_by_text(f"with {run_name} · final").wait_for(timeout=60_000)
    page.locator("#preview-image img").wait_for()
    # the strength sweep: strengths across, every checkpoint of the run down (picked for it), one seed, labelled
    steps = sorted(p.name for p in (demo.root.parent / "runs" / run_name).glob(f"{run_name}-step*.safetensors"))
    first = steps[0].removesuffix(".safetensors") if steps else run_name
    page.locator("#preview-sweep-checkpoints").get_by_text("final").wait_for()
    page.locator("#preview-sweep").click()
    page.locator("#preview-status").get_by_text(f"{run_name} at strengths").wait_for(timeout=90_000)
    grid = page.locator("#preview-sweep-image img")
    grid.wait_for()
    page.locator("#preview-sweep-download").wait_for()  # the grid as one PNG
    click_tile(page, grid, rows=len(steps) + 1, columns=5, row=0, column=4)  # the oldest checkpoint at strength 1
    page.locator("#preview-tile").get_by_text(f"<lora:{first}:1>").wait_for()
    check_layout(page, shots, "4-preview-images")
    readme_shot(page, "preview", "#preview-sweep-checkpoints", "#preview-sweep-image", "#preview-tile")
    page.get_by_role("tab", name="Chat (LLM)").click()
    for control in ("#chat-adapter", "#chat-with", "#chat-without", "#chat-message", "#chat-send"):
        assert page.locator(control).is_visible(), control
    check_layout(page, shots, "5-preview-chat")

    # --- Export: the run's adapters (the final one picked), files, download and install controls
    open_tab(page, "Export")
    pick(page, "export-run", run_name)
    page.locator("#export-status").get_by_text(f"<lora:{run_name}:0.8>").wait_for()
    assert page.locator("#export-adapter input").input_value() == "final"
    if steps:  # an adapter saved along the way: its own tag and header
        pick(page, "export-adapter", f"step {step_of(Path(steps[0]))}")
        page.locator("#export-status").get_by_text(f"<lora:{first}:0.8>").wait_for()
        page.locator("#export-header").get_by_text(steps[0]).wait_for()
        pick(page, "export-adapter", "final")
        page.locator("#export-status").get_by_text(f"<lora:{run_name}:0.8>").wait_for()
    page.wait_for_function("""(names) => {  // the file list names them, however it lays the names out
        const listing = document.querySelector('#export-files').innerText.replace(/\\s+/g, '');
        return names.every((name) => listing.includes(name)); }""", arg=[f"{run_name}.safetensors", "config.yaml"])
    check_layout(page, shots, "6-export")
    assert page.locator("#export-download").is_visible() and page.locator("#export-install").is_visible()
    assert not page.locator("#export-merge").is_visible()  # merging is for LLM adapters


def test_reload_reattaches_to_a_running_job_and_cancels_it(page, url, demo):
    """A job started elsewhere (here: through the API) shows up after a reload; Cancel stops it with a checkpoint."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    _, text, _, _ = client.predict("demo-image", "demo/datasets/demo-shapes", str(demo.sd15), "browser-long",
                                   api_name="/fill_config")
    long = text.rstrip() + "\nmax_train_steps: 100000\nsave_steps: 0\nsample_every_steps: 0\n"
    assert client.predict(long, api_name="/start_training").startswith("✔")
    page.reload()
    page.get_by_text("Go left to right").wait_for()
    open_tab(page, "Train")
    page.locator("#train-status").get_by_text("Training browser-long").wait_for()
    page.locator("#train-progress").get_by_text("/100000").wait_for()
    page.locator("#stop-training").click()
    page.locator("#train-status").get_by_text("Stopped browser-long").wait_for()
    page.locator("#train-action").get_by_text("Cancelling").wait_for(state="detached")  # it is over: not said
    assert "[checkpoint] Saved stop checkpoint" in page.locator("#train-log textarea").input_value()


def type_in_yaml(page, text):
    """The user's own edit: typed at the end of the YAML editor."""
    page.locator("#config-yaml .cm-content").click()
    page.keyboard.press("Control+End")
    page.keyboard.type(text)
    page.wait_for_timeout(600)  # the editor reports its input


def assert_beside(page, message, button):
    """The answer to a press is in view right under the button pressed, not at the top of the tab."""
    page.wait_for_timeout(300)  # the page scrolls to the answer
    below = page.locator(message).bounding_box()["y"] - sum(page.locator(button).bounding_box()[k]
                                                             for k in ("y", "height"))
    height = page.viewport_size["height"]
    box = page.locator(message).bounding_box()
    assert 0 <= below < 150 and 0 <= box["y"] and box["y"] + box["height"] <= height, (message, below, box)


def test_presets_pick_their_model_and_data_and_lists_are_fresh(page, demo, request):
    """A dataset made after the page loaded is offered on the tab switch; the Flux demo preset picks the tiny Flux
    (not the SD demo) and fills; an LLM preset leaves the image dataset for a chat one."""
    late = demo.root.parent / "datasets" / "late-chats"
    late.mkdir(parents=True, exist_ok=True)
    request.addfinalizer(lambda: shutil.rmtree(late, ignore_errors=True))  # the other modules share the workspace
    (late / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "hello"}]}\n')
    configs = demo.root.parent / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "late_cfg.yaml").write_text("preset: demo-image\n")
    request.addfinalizer(lambda: (configs / "late_cfg.yaml").unlink(missing_ok=True))
    open_tab(page, "Config")
    open_tab(page, "Dataset")  # each list as the workspace holds it now, without a reload or a Refresh
    page.locator("#dataset-health").get_by_text("Health check (before training)").click()
    pick(page, "health-config", "late_cfg")
    page.locator("#health-check").click()  # (the config names no model: the report says so)
    page.wait_for_function("() => document.querySelector('#health-report').innerText.trim().length > 0",
                           timeout=60_000)
    pick(page, "dataset-picker", "late-chats")  # the report of the dataset before goes with it
    page.wait_for_function("() => document.querySelector('#health-report').innerText.trim() === ''")
    pick(page, "dataset-picker", "demo-shapes (demo)")
    page.locator("#dataset-health").get_by_text("Health check (before training)").click()
    open_tab(page, "Config")
    pick(page, "config-dataset", "late-chats")
    pick(page, "config-dataset", "demo-shapes (demo)")
    pick(page, "preset-picker", "Demo: tiny random Flux.1")
    page.wait_for_function("() => document.querySelector('#config-base-model input').value.startsWith('tiny-flux')")
    page.locator("#fill-config").click()
    page.locator("#config-status").get_by_text("Filled from the demo-flux preset").wait_for()
    assert "tiny-flux" in page.locator("#config-yaml").inner_text()
    pick(page, "preset-picker", "LLM chat")
    page.wait_for_function("() => !document.querySelector('#config-dataset input').value.includes('shapes')")
    assert page.locator("#config-base-model input").input_value().startswith("tiny-llama")


def test_fill_and_load_replace_on_the_second_press_and_start_never_trains_a_refused_yaml(page, demo, request):
    """The studio's own YAML (filled, restored after a reload) is replaced at once; the user's edits on the second
    press, the refusal shown beside the button; Start refuses while a replacement was refused."""
    request.addfinalizer(lambda: (demo.root.parent / "configs" / "first_cfg.yaml").unlink(missing_ok=True))
    open_tab(page, "Config")
    pick(page, "preset-picker", "Demo: tiny SD, shapes")
    page.locator("#fill-config").click()
    page.locator("#config-status").get_by_text("Filled from the demo-image preset").wait_for()
    name_box = page.locator("#run-name textarea, #run-name input").first
    name_box.fill("")
    name_box.press_sequentially("my-restored-run")
    page.wait_for_function("() => document.querySelector('#config-yaml').innerText.includes('runs/my-restored-run')")
    page.locator("#config-name input, #config-name textarea").first.fill("first_cfg")
    page.locator("#save-config").click()
    page.locator("#config-file-status").get_by_text("Saved configs/first_cfg.yaml").wait_for()
    page.reload()
    page.get_by_text("Go left to right").wait_for()
    open_tab(page, "Config")
    page.locator("#config-status").get_by_text("Restored the YAML").wait_for()
    # the pickers show what the restored YAML holds, not the page's defaults
    assert page.locator("#run-name textarea, #run-name input").first.input_value() == "my-restored-run"
    assert page.locator("#preset-picker input").input_value().startswith("Demo: tiny SD")
    pick(page, "preset-picker", "Character (SD1.5/SDXL)")
    page.locator("#fill-config").click()  # a restored YAML is no edit of the user's: replaced at once
    page.locator("#config-status").get_by_text("Filled from the character preset").wait_for()
    for width, height in VIEWPORTS:
        page.set_viewport_size({"width": width, "height": height})
        type_in_yaml(page, f"\n# my note at {width}")
        pick(page, "preset-picker", "Demo: tiny SD, shapes")
        page.locator("#fill-config").click()
        page.locator("#config-status").get_by_text("holds edits of yours").wait_for()
        assert_beside(page, "#config-status", "#fill-config")
        assert "preset: character" in page.locator("#config-yaml").inner_text()
        if width == VIEWPORTS[0][0]:  # Start would train the old edits under the new pick: refused, and says why
            open_tab(page, "Train")
            page.locator("#start-training").click()
            page.locator("#train-action").get_by_text("Not started").wait_for()
            assert_beside(page, "#train-action", "#start-training")
            open_tab(page, "Config")
        page.locator("#fill-config").click()  # the second press replaces
        page.locator("#config-status").get_by_text("Filled from the demo-image preset").wait_for()
        assert "preset: character" not in page.locator("#config-yaml").inner_text()
        pick(page, "preset-picker", "Character (SD1.5/SDXL)")
        page.locator("#fill-config").click()  # what Fill wrote is replaced at once
        page.locator("#config-status").get_by_text("Filled from the character preset").wait_for()
    type_in_yaml(page, "\n# mine")  # Load: the same, beside the Load button
    pick(page, "saved-configs", "first_cfg")
    page.locator("#load-config").click()
    page.locator("#config-file-status").get_by_text("holds edits of yours").wait_for()
    assert_beside(page, "#config-file-status", "#load-config")
    page.locator("#load-config").click()
    page.locator("#config-file-status").get_by_text("Loaded configs/first_cfg.yaml").wait_for()
    assert "preset: demo-image" in page.locator("#config-yaml").inner_text()
    page.set_viewport_size({"width": VIEWPORTS[0][0], "height": VIEWPORTS[0][1]})


def test_the_loss_line_draws_on_a_freshly_loaded_page(page, url, demo):
    """The last job's loss is a coloured line, not axes alone, on a page loaded after it ran."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    _, text, _, _ = client.predict("demo-image", "demo/datasets/demo-shapes", str(demo.sd15), "browser-loss",
                                   api_name="/fill_config")
    short = text.rstrip() + "\nmax_train_steps: 3\nsave_steps: 0\nsample_every_steps: 0\n"
    assert client.predict(short, api_name="/start_training").startswith("✔")
    for width, height in VIEWPORTS:
        page.set_viewport_size({"width": width, "height": height})
        page.reload()
        page.get_by_text("Go left to right").wait_for()
        open_tab(page, "Train")
        page.locator("#train-status").get_by_text("Finished browser-loss").wait_for(timeout=90_000)
        page.wait_for_function("""() => [...document.querySelectorAll(
            '#loss-plot path[aria-roledescription="line mark"]')].some((line) =>
            line.getAttribute('stroke') && (line.getAttribute('d') || '').split('L').length >= 3)""")
    page.set_viewport_size({"width": VIEWPORTS[0][0], "height": VIEWPORTS[0][1]})


def test_tag_edits_of_a_demo_dataset_go_to_one_copy(page, demo, free_port, tmp_path):
    """The first bulk edit copies the demo dataset, moves the picker to the copy and says so (the message stays);
    the second edit goes to that copy, not to a second one."""
    from studio.ui.app import build_app, launch

    shutil.copytree(demo.root, tmp_path / "demo")  # a workspace of its own: the copy must not reach other tests
    blocks, studio = build_app(tmp_path)
    _, url, _ = launch(blocks, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        # A page of the module's browser (playwright allows one sync session at a time) on this test's studio.
        page = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.set_default_timeout(30_000)
            page.goto(url)
            open_tab(page, "Dataset")
            page.locator("#tag-editor").click()
            page.get_by_label("Tag(s)").fill("alpha")
            page.locator("#tag-apply").click()
            page.locator("#tag-status").get_by_text("went to a copy, datasets/demo-shapes").wait_for()
            page.wait_for_timeout(1000)  # the picker's change has run: the message is still there
            assert "went to a copy" in page.locator("#tag-status").inner_text()
            assert page.locator("#dataset-picker input").input_value() == "demo-shapes"  # the copy, not the demo
            page.get_by_label("Tag(s)").fill("beta")
            page.locator("#tag-apply").click()
            page.locator("#tag-status").get_by_text("Add 'beta'").wait_for()
            assert "went to a copy" not in page.locator("#tag-status").inner_text()
        finally:
            page.close()
    finally:
        blocks.close()
    assert [p.name for p in studio.workspace.datasets.iterdir()] == ["demo-shapes"]
    captions = (studio.workspace.datasets / "demo-shapes" / "metadata.csv").read_text(encoding="utf-8")
    assert "alpha" in captions and "beta" in captions
