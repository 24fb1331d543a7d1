"""A report page as a real browser shows it: headless Chromium (Debian's package, which
`make install` installs) driven by Playwright."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@dataclass
class Rendered:
    images: list[dict]  # each <img>: src, whether it loaded, its drawn width
    tables: list[int]  # each <table>: its rendered rows
    screenshot: Path


def chromium() -> str:
    found = next((p for p in map(shutil.which, BROWSERS) if p), None)
    assert found, "no Chromium on PATH: `make install` installs Debian's (apt-get install chromium)"
    return found


def render(index: Path, screenshot: Path) -> Rendered:
    """Open `index` from disk, wait for it to load, list its images and tables, and save a
    full-page screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(index.resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'), loaded:"
                " i.complete && i.naturalWidth > 0, width: i.getBoundingClientRect().width}))"
            )
            tables = page.evaluate(
                "Array.from(document.querySelectorAll('table')).map(t =>"
                " t.getBoundingClientRect().height > 0 ? t.rows.length : 0)"
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return Rendered(images, tables, screenshot)


def check_rendered(index: Path, screenshot: Path) -> Rendered:
    """Every image loaded and is drawn; every table shows its header and a row."""
    shown = render(index, screenshot)
    assert shown.images and shown.tables
    for image in shown.images:
        assert image["loaded"] and image["width"] > 300, image
    assert all(rows >= 2 for rows in shown.tables), shown.tables
    assert screenshot.stat().st_size > 50_000  # a page of figures, not a blank one
    return shown
