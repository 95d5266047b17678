"""A screenshot of the operator dashboard of a running demo (Playwright over the system's chromium).

Playwright cannot download browsers here: it drives the Debian `chromium` at `executable_path`, as the
browser tests do. Used by `servoloop demo --screenshot PATH` for the README's picture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from schemas.errors import FailedPrecondition

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str:
    """The system chromium; raises FailedPrecondition when there is none."""
    for c in (*CHROMIUM_CANDIDATES, shutil.which("chromium") or ""):
        if c and Path(c).exists():
            return c
    raise FailedPrecondition("no chromium found (apt-get install chromium) for the dashboard screenshot")


async def dashboard_screenshot(dashboard_url: str, admin_key: str, out: Path, *, since: str = "1h",
                               width: int = 1500, height: int = 1000) -> Path:
    """Open the dashboard, connect with `admin_key`, show the last `since`, and save a full-page PNG at `out`.

    Raises FailedPrecondition without Playwright or chromium; Playwright's TimeoutError when the page does not load.
    """
    try:
        from playwright.async_api import async_playwright
    except ImportError as e:
        raise FailedPrecondition("the dashboard screenshot needs playwright (pip install playwright)") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            await page.goto(f"{dashboard_url.rstrip('/')}/dashboard/")
            await page.fill("#key", admin_key)
            await page.click("#connect")
            await page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1", timeout=60_000)
            before = await page.evaluate("Number(document.body.dataset.refreshes)")
            await page.select_option("#since", since)
            await page.wait_for_function(f"Number(document.body.dataset.refreshes) > {before}", timeout=60_000)
            await page.wait_for_timeout(1500)  # charts finish drawing
            await page.screenshot(path=str(out), full_page=True)
        finally:
            await browser.close()
    return out
