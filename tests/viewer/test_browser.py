"""The viewer in a real browser: Debian's chromium driven by Playwright, all non-loopback network blocked.

Needs ``playwright`` (the Python package only: never ``playwright install``) and ``/usr/bin/chromium``
(``apt-get install -y chromium``); skips with the reason when either is missing. WebGL runs on SwiftShader.
"""

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

CHROMIUM = os.environ.get("AVATAR_TEST_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _requirements() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; do not run `playwright install`)"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import viser  # noqa: F401
    except ImportError:
        return "viser is not installed (pip install 'avatar[viewer]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, anny_body):
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from tests.viewer.conftest import write_bundle

    tmp = tmp_path_factory.mktemp("browser")
    bundle = write_bundle(tmp / "avatar", anny_body, n=6000)
    port = _free_port()
    out = tmp / "exports"
    proc = subprocess.Popen([sys.executable, "-m", "viewer.app", str(bundle), "--port", str(port), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if "avatar-viewer: serving" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(60):
            pytest.fail("the viewer did not start within 60 s:\n" + "".join(lines))
        url = re.search(r"http://(\S+)", [x for x in lines if "avatar-viewer: serving" in x][0]).group(0)
        assert urlparse(url).hostname == "127.0.0.1"
        yield url, out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _only_loopback(route):
    host = urlparse(route.request.url).hostname
    if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


def _canvas(page) -> np.ndarray:
    """The 3D view left of the GUI panel and below the notifications, as float RGB [H, W, 3]."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"), dtype=np.float32)
    return img[170:690, 0:640]


def _wait_for(cond, timeout: float, what: str, interval: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value is not None and value is not False:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_viewer_in_chromium(server):
    from playwright.sync_api import sync_playwright

    url, out = server
    start = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
            "--disable-gpu-sandbox", "--no-first-run", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.route("**/*", _only_loopback)
            page.set_default_timeout(20_000)
            page.goto(url)
            readout = page.get_by_text(re.compile(r"pose updates"))
            readout.wait_for()

            # the avatar is drawn: the 3D view is not blank (white background alone has no variance)
            first = _wait_for(lambda: (lambda c: c if c.std() > 20 else None)(_canvas(page)), 20, "the avatar to draw")
            dark = (first.mean(-1) < 200).mean()
            assert 0.01 < dark < 0.5, f"fraction of non-background pixels {dark:.3f}"

            # a joint slider changes the picture: raise the left shoulder to its maximum from the keyboard
            fid = page.locator("label", has_text=re.compile(r"^Left shoulder$")).get_attribute("for")
            thumb = page.locator(f"[id='{fid}'] [role=slider]")
            thumb.focus()
            page.keyboard.press("End")
            assert thumb.get_attribute("aria-valuenow") == "120"
            moved = _wait_for(lambda: (lambda c: c if np.abs(c - first).mean() > 0.4 else None)(_canvas(page)), 15,
                              "the slider to change the picture")
            assert np.abs(moved - first).mean() > 0.4

            # playing the shipped walk advances frames: the readout's frame number and the picture change
            page.get_by_role("button", name="Play").click()
            frame = re.compile(r"frame (\d+) / (\d+)")

            def frame_no():
                m = frame.search(readout.inner_text())
                return int(m.group(1)) if m else None

            f0 = _wait_for(frame_no, 10, "the motion to start")
            a = _canvas(page)
            f1 = _wait_for(lambda: (lambda f: f if f not in (None, f0) else None)(frame_no()), 10, "a new frame")
            assert f1 != f0
            b = _wait_for(lambda: (lambda c: c if np.abs(c - a).mean() > 0.3 else None)(_canvas(page)), 10,
                          "the picture to change while playing")
            assert np.abs(b - a).mean() > 0.3
            page.get_by_role("button", name="Pause").click()

            # export writes a posed .ply and a screenshot into the output folder
            page.get_by_role("button", name=re.compile("Export pose")).click()
            page.get_by_text(re.compile(r"wrote .*\.png")).wait_for()
            names = sorted(x.suffix for x in out.iterdir())
            assert names == [".ply", ".png"], names
            from avatar.export.ply import read_splat_ply

            assert len(read_splat_ply(next(out.glob("*.ply")))) == 6000
        finally:
            browser.close()
    assert time.monotonic() - start < 60
