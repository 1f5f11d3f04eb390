"""Headless Chromium for the browser tests: Debian's ``/usr/bin/chromium`` (installed by scripts/setup) driven
by Playwright, never a browser build of Playwright's own. Every network feature that would call out of the
machine is off."""

from __future__ import annotations

import contextlib
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGUMENTS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextlib.contextmanager
def chromium_page(width: int = 1200, height: int = 900, **context_options):
    """A fresh page of a headless Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGUMENTS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, **context_options)
            yield context.new_page()
        finally:
            browser.close()


def loaded_images(page) -> list[list]:
    """[complete, naturalWidth, naturalHeight] of every image of the page, after it has loaded."""
    return page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
