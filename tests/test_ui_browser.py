"""The studio in a real browser: headless Debian Chromium driven by playwright (no browser download). Visits every
tab, checks its main controls, runs the demo through it, and saves one screenshot per tab.

Screenshots go to $STUDIO_SCREENSHOTS if set, else to the test's temporary folder (printed with -s)."""

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

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


def pick(page, elem_id, text):
    """Choose `text` in a gradio Dropdown by typing it and taking the matching option."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(text)
    page.get_by_role("option", name=text).first.click()


def test_every_tab(page, shots):
    # --- Dataset: pick the demo dataset; thumbnails, captions and the validation report appear
    open_tab(page, "Dataset")
    for control in ("#dataset-picker", "#dataset-upload", "#caption-table", "#auto-label"):
        assert page.locator(control).is_visible(), control
    pick(page, "dataset-picker", "demo-shapes (demo)")
    page.locator("#dataset-gallery img").first.wait_for()
    assert page.locator("#dataset-gallery img").count() >= 8
    page.locator("#dataset-report").get_by_text("ready to train").wait_for()
    page.screenshot(path=str(shots / "1-dataset.png"), full_page=True)

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
    page.screenshot(path=str(shots / "2-config.png"), full_page=True)

    # --- Train: start the demo run; progress, loss plot and samples update from the timer
    open_tab(page, "Train")
    page.locator("#start-training").click()
    page.locator("#train-status").get_by_text("Finished").wait_for(timeout=90_000)
    assert "step 20/20" in page.locator("#train-progress").inner_text()
    page.locator("#train-samples img").first.wait_for()
    assert "[done]" in page.locator("#train-log textarea").input_value()
    page.wait_for_timeout(500)  # let the plot draw
    page.screenshot(path=str(shots / "3-train.png"), full_page=True)

    # --- Preview: the new run is offered; generate with it
    open_tab(page, "Preview")
    pick(page, "preview-adapter-1", run_name)
    assert "tiny-sd15" in page.locator("#preview-base input").input_value()
    page.locator("#preview-generate").click()
    page.locator("#preview-status").get_by_text(f"with {run_name}").wait_for(timeout=60_000)
    page.locator("#preview-image img").wait_for()
    page.screenshot(path=str(shots / "4-preview-images.png"), full_page=True)
    page.get_by_role("tab", name="Chat (LLM)").click()
    for control in ("#chat-adapter", "#chat-with", "#chat-without", "#chat-message", "#chat-send"):
        assert page.locator(control).is_visible(), control
    page.screenshot(path=str(shots / "5-preview-chat.png"), full_page=True)

    # --- Export: the run's files, download and install controls
    open_tab(page, "Export")
    pick(page, "export-run", run_name)
    page.locator("#export-status").get_by_text(f"<lora:{run_name}:0.8>").wait_for()
    page.screenshot(path=str(shots / "6-export.png"), full_page=True)
    listing = page.locator("#export-files").inner_text()  # names show as stem + suffix
    assert f"{run_name}\n.safetensors" in listing and "config\n.yaml" in listing
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
    assert "[checkpoint] Saved stop checkpoint" in page.locator("#train-log textarea").input_value()
