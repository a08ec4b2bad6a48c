"""The playground page in a real headless browser: Debian's chromium driven by Playwright.

Against kandinsky-openai on the session's Triton (the tiny preset, 64 px): type a prompt, generate, see the
previews stream in and then the final image (the same pixels as the server loop gives for that seed);
inpaint an uploaded image through a mask painted with the brush; a refused request shows the server's
message. A screenshot of each page is saved under the test's tmp dir and its path printed.
`bash .ci/run` installs chromium when it is missing; Playwright downloads no browser of its own.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from kandinsky_core.request import GenerationRequest
from kandinsky_repository.openai_api.server import OpenAIServer
from kandinsky_repository.serving.triton import free_port
from PIL import Image

from .reference import picture

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright drives the browser (requirements/cpu.txt)"
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless chromium on a closed network: no sandbox (root in CI), no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def page_url(triton_server):
    with OpenAIServer(triton_server.grpc_url, port=free_port()) as server:
        yield f"http://{server.host}:{server.port}/"


@pytest.fixture
def page(tmp_path: Path):
    if CHROMIUM is None:
        pytest.skip("no chromium here: `bash .ci/run` installs Debian's chromium")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        tab = context.new_page()
        tab.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        yield tab
        context.close()
        assert errors == [], f"the page's script failed: {errors}"


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"playground screenshot: {path}")
    return path


def image_of(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def choose_small_generation(page, steps: int) -> None:
    if page.locator("#width").is_visible():  # (the image modes take the input's size)
        page.select_option("#width", "64")
        page.select_option("#height", "64")
    page.fill("#steps", str(steps))
    if page.locator("#prior-steps").is_visible():  # (variations run no prior)
        page.fill("#prior-steps", "2")
    page.fill("#seed", "7")
    page.select_option("#partials", "3")


def test_prompt_previews_then_the_final_image(page, page_url, tmp_path, server_loop_clients):
    page.goto(page_url)
    page.wait_for_selector("body[data-state=ready]")
    page.fill("#prompt", "a red cat on a windowsill")
    choose_small_generation(page, steps=8)
    page.click("#generate")
    page.wait_for_selector("body[data-state=done]")
    events = page.locator("#events li").all_inner_texts()
    assert events == ["mode text_to_image", "preview 1", "preview 2", "preview 3", "image 1 done"], events
    preview = page.locator("#preview")
    assert preview.is_visible() and image_of(preview.get_attribute("src")).size == (64, 64)
    result = image_of(page.locator("#result-0").get_attribute("src"))
    assert result.size == (64, 64)
    assert "seed 7" in page.inner_text("#seed-used")
    assert page.locator("#results a[download]").first.get_attribute("download").endswith(".png")
    want = server_loop_clients["grpc"].generate(
        GenerationRequest.build(
            "text_to_image",
            prompt="a red cat on a windowsill",
            height=64,
            width=64,
            num_inference_steps=8,
            prior_num_inference_steps=2,
            seed=7,
            guidance_scale=4.0,
            prior_guidance_scale=4.0,
        )
    )
    np.testing.assert_array_equal(np.asarray(result.convert("RGB")), np.asarray(want.images[0]))
    screenshot(page, tmp_path, "text-to-image")


def test_inpaint_with_a_painted_mask(page, page_url, tmp_path):
    source = tmp_path / "photo.png"
    picture(64, 64, seed=3).save(source)
    page.goto(page_url)
    page.wait_for_selector("body[data-state=ready]")
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#image-file", str(source))
    page.wait_for_function("document.getElementById('source').width === 64")
    page.fill("#prompt", "a golden hat")
    choose_small_generation(page, steps=4)
    # Nothing painted yet: the server says what is missing, and the page shows it in words.
    page.click("#generate")
    page.wait_for_selector("body[data-state=error]")
    assert "mask: has no transparent pixels" in page.inner_text("#error")
    # Paint a stroke across the middle of the image with the brush.
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    painted = page.evaluate(
        """() => {
            const c = document.getElementById('mask');
            const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < data.length; i += 4) n += data[i] > 0;
            return n;
        }"""
    )
    assert 0 < painted < 64 * 64 / 2, painted
    page.click("#generate")
    page.wait_for_selector("body[data-state=done]")
    assert page.locator("#error").is_hidden()
    assert "mode inpaint" in page.locator("#events li").all_inner_texts()
    result = image_of(page.locator("#result-0").get_attribute("src"))
    assert result.size == (64, 64)
    screenshot(page, tmp_path, "inpaint")
    # The result is the next input of every other image mode.
    page.click("#results button")
    for mode, size in [
        ("image_to_image", (64, 64)),
        ("variations", (64, 64)),
        ("fuse", (64, 64)),
        ("outpaint", (128, 64)),
    ]:
        page.check(f"input[name=mode][value={mode}]")
        choose_small_generation(page, steps=4)
        page.click("#generate")
        page.wait_for_selector("body[data-state=done]")
        assert f"mode {mode}" in page.locator("#events li").all_inner_texts()
        assert image_of(page.locator("#result-0").get_attribute("src")).size == size, mode
    screenshot(page, tmp_path, "outpaint")
