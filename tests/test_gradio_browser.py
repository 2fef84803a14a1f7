"""The demo in a real browser: Debian's chromium driven by Python playwright (never
`playwright install`: it downloads a browser, which fails here). Uploads a picture, opens
"Advanced options", sets Steps and Images, clicks Run and waits for the gallery; keeps a
screenshot in the pytest tmp dir. UPDATE_SCREENSHOT=1 copies it to docs/screenshot_gradio.png (the
README's picture, tracked: a plain test run leaves it alone).
"""
import os
import re
import shutil
import sys

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)     # the demo is a script at the repo root
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gradio_canny2image as app  # noqa: E402
from conftest import launch_demo  # noqa: E402
from runtime.sample import SAMPLE_PROMPT, sample_image  # noqa: E402
from bench_web_path import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (one Chromium set-up)

SCREENSHOT = os.path.join(REPO, "docs", "screenshot_gradio.png")
STEPS, IMAGES = 2, 2
_RECORD_GALLERY_TEXTS = """() => {
    const gallery = document.querySelector("#gallery");
    window.galleryTexts = [];
    new MutationObserver(() => window.galleryTexts.push(gallery.innerText))
        .observe(gallery, {subtree: true, childList: true, characterData: true});
}"""



@pytest.fixture(scope="module")
def url():
    from runtime.app import build_pipeline

    banner = "Tiny model with random weights (`--tiny`): a smoke test, outputs are noise."
    demo = app.create_demo(build_pipeline("cpu", tiny=True, mode="reference"), banner=banner)
    local_url = launch_demo(demo)
    try:
        yield local_url
    finally:
        demo.close()


def _set_slider(page, label, value):
    """Type into the slider's number box, as a person does for an exact value, and leave it.

    Checked on the range input, and typed again if the page was still wiring the freshly opened
    accordion up (the first edit can then be lost)."""
    box = page.get_by_label(f"number input for {label}", exact=True)
    slider = page.get_by_label(f"range slider for {label}", exact=True)
    for _ in range(5):
        box.fill(str(value))
        box.press("Tab")
        try:
            expect(slider).to_have_value(str(value), timeout=3_000)
            return
        except AssertionError:
            continue
    expect(slider).to_have_value(str(value))


def test_run_in_browser(url, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install -y chromium` (Debian's "
                    "chromium; never `playwright install`)")
    # Generous waits: CI machines and this one run other test suites at the same time.
    expect.set_options(timeout=30_000)
    picture = tmp_path / "house.png"
    Image.fromarray(sample_image(640, 480)).save(picture)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            expect(page.get_by_text("Control Stable Diffusion with Canny Edge Maps")).to_be_visible()

            page.locator("input[type=file]").first.set_input_files(str(picture))
            expect(page.locator("#input_image img").first).to_be_visible()
            page.get_by_label("Prompt", exact=True).fill(SAMPLE_PROMPT)

            page.get_by_text("Advanced options").click()
            expect(page.get_by_label("number input for Steps")).to_be_visible()
            _set_slider(page, "Steps", STEPS)
            _set_slider(page, "Images", IMAGES)
            _set_slider(page, "Image Resolution", 256)
            _set_slider(page, "Seed", 12345)      # the same screenshot on every run

            # Every text the gallery shows while it runs: the progress bar's "i/N steps" can be
            # on screen for a fraction of a second, too short to poll for reliably.
            page.evaluate(_RECORD_GALLERY_TEXTS)
            page.get_by_role("button", name="Run").click()
            thumbnails = page.locator("#gallery img")
            expect(thumbnails).to_have_count(IMAGES + 1, timeout=180_000)
            for i in range(IMAGES + 1):
                expect(thumbnails.nth(i)).to_be_visible()
            expect(page.locator(".toast-body.error")).to_have_count(0)
            # The progress bar went over the DDIM steps (gr.Progress fed by process's callback).
            seen = " | ".join(page.evaluate("() => window.galleryTexts"))
            assert re.search(rf"\b[1-9]\d*/{STEPS} steps", seen), seen
            assert "DDIM sampling" in seen, seen
            # Under the gallery: how long it took, where, in which mode.
            expect(page.locator("#request-info")).to_contain_text(
                re.compile(rf"{IMAGES} images at \d+×\d+ in \d+\.\d\d s · CPU · reference mode"))

            shot = tmp_path / "screenshot_gradio.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert Image.open(shot).size[0] >= 1280
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
