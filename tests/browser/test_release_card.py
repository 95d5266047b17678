"""The dashboard's models view shows a version's model card, generated from the registry by the release API."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import async_playwright

from feedback.dashboard.release_api import release_extension
from gateway.auth import KeyStore
from tests.browser.dashboard_support import admin_gateway, new_store, seed_dashboard

CHROMIUM = "/usr/bin/chromium"


async def test_the_card_button_shows_the_model_card_of_that_version(keystore: KeyStore, tmp_path: Path):
    store = await new_store()
    seeded = await seed_dashboard(store, tmp_path / "reports")
    async with admin_gateway(store, keystore, report_dir=seeded.report_dir,
                             extensions=(release_extension,)) as gw, async_playwright() as pw:
        _, key = gw.key()
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        try:
            await page.goto(f"{gw.http}/admin/dashboard/")
            await page.fill("#key", key)
            await page.click("#connect")
            await page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1", timeout=30_000)
            assert await page.is_hidden("#model-card")
            await page.click("#versions button[data-card='v2']")
            await page.wait_for_function(
                "document.getElementById('model-card').textContent.includes('Model card')", timeout=15_000)
            card = await page.text_content("#model-card")
            assert card is not None
            assert "# Model card: chat@v2" in card and "state **canary**" in card and "| base model | tiny-chat |" in card
            assert seeded.trigger.event_id in card  # the trigger behind v2, from its lineage
            assert "## Intended use" in card
            assert await page.is_visible("#model-card")
            assert problems == []
        finally:
            await browser.close()
    await store.query(f"DROP DATABASE IF EXISTS {store.database}")
