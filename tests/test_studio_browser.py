"""The layout studio in a real browser: headless Chromium (Debian's) paints two regions, types two phrases, clicks
Generate, and the image the page shows equals, bit for bit, what `scripts/generate.py --layout` makes from the
layout the page offers for download. On the way it checks that a region without a phrase gets a message in the
page, and that the page sends no request beyond this machine; then it switches the method to Regional Prompting
and generates again.

Environment variables (docs/studio.md):
  STUDIO_SCREENSHOT=path.png   where to save the page's screenshot (default: the test's temporary folder);
                               the Regional Prompting one goes beside it, as path_regional.png
  STUDIO_REPEATS=N             time N more clicks and N CLI runs, alternating, on seeds 1..N
  STUDIO_TIMING=path.json      write those times there
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHRASES = ("a red circle", "a blue square")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                "(bash scripts/test.sh installs it when it can)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(argv: list[str], out: Path) -> float:
    """Run scripts/generate.py as a user would; returns the seconds it reports for the generation."""
    done = subprocess.run([sys.executable, "scripts/generate.py", *argv, "--out", str(out), "--overwrite"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return float(re.search(r"1 image\(s\) in ([\d.]+) s", done.stderr).group(1))


def test_paint_generate_and_the_cli_makes_the_same_image(tmp_path):
    pytest.importorskip("gradio")
    from playwright.sync_api import sync_playwright

    from scripts.studio import launch

    app = launch(None, port=free_port(), block=False, quiet=True)
    outside: list[str] = []
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                tmp_path / "profile", executable_path=str(CHROMIUM), headless=True, args=FLAGS,
                viewport={"width": 1440, "height": 1000}, accept_downloads=True)
            page = context.pages[0] if context.pages else context.new_page()

            def only_loopback(route):  # anything not on this machine is refused and counted
                if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            context.route("**/*", only_loopback)
            page.set_default_timeout(120_000)
            page.goto(app.local_url)
            canvas = page.locator("#studio-canvas canvas").first
            canvas.wait_for()
            page.wait_for_timeout(500)
            box = canvas.bounding_box()
            cx, cy, side = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, min(box["width"], box["height"])

            def paint(colour: int, x0: float, y0: float, x1: float, y1: float) -> None:
                """Pick a brush colour from the editor's menu, then zigzag over [x0, x1] x [y0, y1] (fractions of
                the canvas side from its centre)."""
                page.click("#studio-canvas button[aria-label=Color]")
                page.locator("#studio-canvas menu button").nth(colour).click()
                page.keyboard.press("Escape")
                xs, ys = (cx + x0 * side, cx + x1 * side), [cy + y * side for y in np.linspace(y0, y1, 3)]
                page.mouse.move(xs[0], ys[0])
                page.mouse.down()
                for i, y in enumerate(ys):
                    page.mouse.move(xs[i % 2], y)
                    page.mouse.move(xs[(i + 1) % 2], y)
                page.mouse.up()

            def type_phrase(colour: int, text: str) -> None:
                page.locator(f"#phrase-{colour}").wait_for(state="visible")  # the page saw the paint
                field = page.locator(f"#phrase-{colour} input")
                field.fill(text[:-1])  # pasted, then the last key typed: one input event, as a person's last key
                field.press_sequentially(text[-1])

            paint(0, -0.3, -0.3, -0.05, -0.1)
            page.locator("#phrase-0").wait_for(state="visible")
            page.click("#generate-button")  # the red region has no phrase yet: a message, and the page goes on
            page.get_by_text("the red region has no phrase").wait_for()
            page.locator(".toast-close").first.click()
            type_phrase(0, PHRASES[0])
            paint(1, 0.05, 0.1, 0.3, 0.3)
            type_phrase(1, PHRASES[1])
            page.wait_for_function("document.querySelector('#prompt textarea').value === "
                                   f"{json.dumps(' and '.join(PHRASES))}")

            def click_and_wait() -> float:
                """Seconds from the click on Generate to a new image loaded in the page."""
                old = page.evaluate("document.querySelector('#result img')?.src ?? ''")
                started = time.perf_counter()
                page.click("#generate-button", no_wait_after=True)
                page.wait_for_function("(old) => { const img = document.querySelector('#result img');"
                                       " return img && img.src !== old && img.complete && img.naturalWidth > 0; }",
                                       arg=old, polling=50)
                return time.perf_counter() - started

            def shown_image() -> np.ndarray:
                src = page.evaluate("document.querySelector('#result img').src")
                return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())))

            first = click_and_wait()
            shown = shown_image()
            page.locator("#layout-out:not([disabled])").wait_for()
            with page.expect_download() as download:
                page.click("#layout-out")
            download.value.save_as(tmp_path / "layout.zip")
            with zipfile.ZipFile(tmp_path / "layout.zip") as z:
                names = sorted(z.namelist())
                z.extractall(tmp_path / "exported")
            command = page.locator("#studio-command textarea").input_value()
            page.locator("#maps img").first.wait_for()
            page.wait_for_timeout(300)
            screenshot = Path(os.environ.get("STUDIO_SCREENSHOT") or tmp_path / "page.png")
            page.screenshot(path=screenshot, full_page=True)

            repeats = int(os.environ.get("STUDIO_REPEATS", "0"))
            clicks, runs, in_page, repeated = [], [], [], []
            for seed in range(1, repeats + 1):
                page.locator("#seed input").fill(str(seed))
                page.locator("#seed input").press("Tab")
                clicks.append(click_and_wait())
                said = page.inner_text("#studio-time")  # "3.55 s to generate (...)": the page's pipeline call
                in_page.append(float(re.search(r"([\d.]+) s to generate", said).group(1)))
                repeated.append(shown_image())
                runs.append(cli(["--layout", str(tmp_path / "exported" / "layout.json"), "--seed", str(seed)],
                                tmp_path / f"cli_{seed}.png"))

            # Regional Prompting: its settings replace the preset's, the page runs it and says why there are no maps
            page.locator("#seed input").fill("0")
            page.locator("#seed input").press("Tab")
            page.get_by_label("Regional Prompting").check()
            page.locator("#base-ratio").wait_for(state="visible")
            preset_hidden = page.locator("#preset").is_hidden()
            click_and_wait()
            regional = shown_image()
            regional_command = page.locator("#studio-command textarea").input_value()
            page.get_by_text("Regional Prompting masks the attention").wait_for()
            page.wait_for_timeout(300)
            page.screenshot(path=screenshot.with_name(screenshot.stem + "_regional.png"), full_page=True)
            context.close()
    finally:
        app.close()

    assert not outside, f"the page asked for addresses beyond this machine: {outside}"
    assert names == ["layout.json", "region_0.png", "region_1.png"]
    layout = json.loads((tmp_path / "exported" / "layout.json").read_text())
    assert [r["phrase"] for r in layout["regions"]] == list(PHRASES)
    assert ("--layout layout.json --seed 0 --steps 20 --cfg 4.5 --height 128 --width 128 --dense-preset faithful "
            "--dense-strength 1.0") in command
    argv = command[command.index("--layout"):command.index("--out")].split()
    argv[1] = str(tmp_path / "exported" / "layout.json")
    cli_seconds = cli(argv, tmp_path / "cli.png")
    made = np.asarray(Image.open(tmp_path / "cli.png"))
    assert shown.shape == made.shape == (128, 128, 3)
    assert (shown == made).all(), "the page's image differs from the CLI's for the exported layout"
    assert preset_hidden and "--layout-method regional --base-ratio 0.3 --inject-steps 10 --inject-interval 1 " \
        "--background-prompt ''" in regional_command and "--dense-preset" not in regional_command
    assert not (regional == shown).all(), "Regional Prompting drew the same image as DenseDiffusion"
    for seed, image in enumerate(repeated, 1):
        assert (image == np.asarray(Image.open(tmp_path / f"cli_{seed}.png"))).all(), seed
    if os.environ.get("STUDIO_TIMING"):
        Path(os.environ["STUDIO_TIMING"]).write_text(json.dumps({
            "first_click_to_image_s": first, "first_cli_s": cli_seconds,
            "click_to_image_s": clicks, "cli_s": runs, "pipeline_call_in_page_s": in_page,
            "median_click_to_image_s": statistics.median(clicks) if clicks else None,
            "median_cli_s": statistics.median(runs) if runs else None,
            "median_pipeline_call_in_page_s": statistics.median(in_page) if in_page else None}, indent=1))
