"""The page in a real browser: Debian's Chromium driven by Playwright (never ``playwright
install``). Upload an image, draw a box with the mouse, see the mask and the table, drag the
box's corner, see them again, label a box with a class; a screenshot is kept as an artifact
(pytest's tmp dir and ``artifacts/app_browser.png`` at the repository root)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"  # gitignored
EXAMPLE = REPO / "app" / "examples" / "shapes_1.png"  # 320 x 240
TIMEOUT_MS = 60_000

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e .[app]")
pytest.importorskip("gradio_image_annotation", reason="the app needs the 'app' extra")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@pytest.fixture()
def page(app_server, request):
    """A fresh page on the app; on failure its screenshot goes to artifacts/."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1100})
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(app_server, wait_until="networkidle")
        failed_before = request.session.testsfailed
        yield pg
        if request.session.testsfailed > failed_before:
            ARTIFACTS.mkdir(exist_ok=True)
            pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}_failure.png"))
        browser.close()


def _overlay_size(page) -> list[int]:
    """[width, height] of the mask overlay picture once it has loaded (visible is not enough:
    an image that is shown but not yet decoded has a natural size of 0 x 0)."""
    page.wait_for_function(
        "() => { const i = document.querySelector('#overlay img');"
        " return i && i.complete && i.naturalWidth > 0; }", timeout=TIMEOUT_MS)
    return page.locator("#overlay img").evaluate("i => [i.naturalWidth, i.naturalHeight]")


def _wait_status(page, text: str) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)",
                           arg=text, timeout=TIMEOUT_MS)
    return page.inner_text("#status")


def _to_page(page, x: float, y: float, size: tuple[int, int]) -> tuple[float, float]:
    """Image pixel (x, y) -> page coordinates on the annotator canvas, which shows the image
    centred and scaled to fit (the component's own fit-to-canvas rule)."""
    canvas = page.locator("#annotator canvas")
    box = canvas.bounding_box()
    cw, ch = canvas.evaluate("c => [c.width, c.height]")
    w, h = size
    s = min(cw / w, ch / h)
    ox, oy = (cw - w * s) / 2, (ch - h * s) / 2
    css = box["width"] / cw
    return box["x"] + (ox + x * s) * css, box["y"] + (oy + y * s) * css


def _drag(page, start, end, size, steps: int = 12) -> None:
    x0, y0 = _to_page(page, *start, size)
    x1, y1 = _to_page(page, *end, size)
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, steps + 1):
        page.mouse.move(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps)
    page.mouse.up()


#: The instance table's rows as lists of cell texts (Gradio's Dataframe is a grid of divs).
ROWS_JS = """Array.from(document.querySelectorAll('#instances [role=row][data-index]'))
    .sort((a, b) => a.dataset.index - b.dataset.index)
    .map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))"""


def _table(page) -> list[list[str]]:
    return page.evaluate(f"() => {ROWS_JS}")


def _wait_table(page, expected: list[tuple[str | None, list[int]]], tol: int = 2) -> None:
    """Wait until the table has one row per ``(class or None, box)``, boxes within ``tol``."""
    page.wait_for_function(
        f"""([expected, tol]) => {{
            const rows = {ROWS_JS};
            return rows.length === expected.length && rows.every((r, i) => {{
                const [cls, box] = expected[i];
                const got = r[4].split(',').map(Number);
                return (cls === null || r[1] === cls)
                    && box.every((v, k) => Math.abs(got[k] - v) <= tol);
            }});
        }}""", arg=[expected, tol], timeout=TIMEOUT_MS)


def test_draw_a_box_see_the_mask_adjust_it_see_again(page, tmp_path):
    size = (320, 240)
    page.locator("#annotator input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#annotator canvas").wait_for(state="visible")
    _wait_status(page, "Draw a box")  # the upload alone shows the image and a hint

    _drag(page, (20, 8), (160, 148), size)  # around the striped disc
    assert "1 box segmented" in _wait_status(page, "Done")
    _wait_table(page, [(None, [20, 8, 160, 148])])
    assert _overlay_size(page) == list(size)

    # adjust: drag mode, pull the box's bottom-right corner out; the mask follows
    page.get_by_role("button", name="Drag boxes").click()
    _drag(page, (160, 148), (180, 170), size)
    _wait_table(page, [(None, [20, 8, 180, 170])])

    # choose the box's class: double-click it, pick "ring" in the annotator's dialog
    page.mouse.dblclick(*_to_page(page, 90, 80, size))
    option = page.locator("#annotator li[aria-label='ring']")
    option.wait_for(state="visible")
    option.click()
    page.wait_for_function("() => document.querySelector('#annotator input[aria-label=Label]')"
                           ".value === 'ring'")
    page.locator("#annotator button", has_text="OK").click()
    _wait_table(page, [("ring", [20, 8, 180, 170])])

    # a second box (listed first: the annotator puts new boxes first); both rows are shown
    page.get_by_role("button", name="Create box").click()
    _drag(page, (195, 30), (315, 158), size)
    assert "2 boxes segmented" in _wait_status(page, "2 boxes")
    _wait_table(page, [(None, [195, 30, 315, 158]), ("ring", [20, 8, 180, 170])])
    rows = _table(page)
    assert [r[0] for r in rows] == ["1", "2"] and all(int(r[3]) > 0 for r in rows)  # areas
    assert page.locator("a[download]").count() >= 2  # COCO JSON and instance PNG downloads
    # the overlay is replaced after the table: wait until the new picture has loaded
    assert _overlay_size(page) == list(size)

    shot = tmp_path / "app_browser.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "app_browser.png")
    assert shot.stat().st_size > 10_000


def test_corrupt_upload_shows_a_message_and_the_page_keeps_working(page, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    page.locator("#annotator input[type=file]").set_input_files(str(corrupt))
    status = _wait_status(page, "Error")
    assert "corrupt.png: corrupt or truncated" in status
    page.get_by_role("button", name="Remove Image").click()
    page.locator(".gallery-item").first.click()  # an example, with its two boxes
    assert "2 boxes segmented" in _wait_status(page, "Done")
    _wait_table(page, [(None, [23, 11, 157, 145]), (None, [195, 34, 315, 154])], tol=0)
