"""Headless Chromium loads the operator dashboard from a real gateway over seeded chDB data.

The charts must carry the seeded values (read back from Plotly's `gd.data` in the page), a rollback
click must reach the admin API (the published ModelEvent), and a screenshot is kept in tests/artifacts/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from playwright.async_api import Page, async_playwright

from feedback.store import write_events
from gateway.auth import KeyStore
from schemas.events import ModelEvent, MonitorResult
from tests.browser.dashboard_support import QUALITY_V1, admin_gateway, new_store, seed_dashboard

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


async def traces(page: Page, chart: str) -> list[dict[str, Any]]:
    """The data Plotly drew in `#chart` (name, x, y, meta of every trace)."""
    return await page.evaluate(
        """(id) => (document.getElementById(id).data || []).map(
               (t) => ({name: t.name, x: t.x, y: t.y, meta: t.meta || null, type: t.type || 'scatter'}))""", chart)


async def test_dashboard_renders_the_seeded_data_and_a_rollback_click_reaches_the_api(keystore: KeyStore,
                                                                                      tmp_path: Path):
    store = await new_store()
    seeded = await seed_dashboard(store, tmp_path / "reports")
    # the canary monitor's latest decision on v2 (canary since base + 55 min): wait, too few requests
    await write_events(store, [MonitorResult(
        ts_ms=seeded.base_ms + 58 * 60_000, monitor="canary", metric="canary_decision", model="chat",
        model_version="v2", status="insufficient_data", details=json.dumps({
            "monitor_kind": "canary", "decision": "wait", "reasons": ["too few requests: canary 0, active 0"]}))])
    async with admin_gateway(store, keystore, report_dir=seeded.report_dir) as gw, async_playwright() as pw:
        key_id, key = gw.key()
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1500, "height": 1000})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("dialog", lambda d: d.accept())  # the confirm() before an action
        try:
            await page.goto(f"{gw.http}/admin/dashboard/")
            assert await page.text_content("#status") == "enter an admin key"
            await page.fill("#key", key)
            await page.click("#connect")
            await page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1", timeout=30_000)
            assert await page.evaluate("sessionStorage.getItem('servoloop.adminKey')") == key

            # quality: the thumbs-up series of v1 with its confidence band
            await page.select_option("#metric", "thumbs_up_rate")
            quality = await traces(page, "chart-quality")
            line = next(t for t in quality if t["meta"] and t["meta"].get("metric") == "thumbs_up_rate")
            assert line["name"].startswith("chat@v1") and line["x"] == seeded.quality_ts
            assert line["y"] == [v for v, _, _ in QUALITY_V1]
            bands = {t["meta"]["band"]: t["y"] for t in quality if t["meta"] and "band" in t["meta"]}
            assert bands == {"low": [lo for _, lo, _ in QUALITY_V1], "high": [hi for _, _, hi in QUALITY_V1]}

            # drift: the latest score per feature
            [drift] = await traces(page, "chart-drift")
            assert (drift["type"], drift["x"], drift["y"]) == (
                "bar", ["dataset_drift", "prompt_length", "tokens_in"], [0.5, 0.31, 0.02])
            assert await page.locator("#drift-reports a").count() == 1

            # guardrails (24 h window: 10-minute buckets; all seeded verdicts fall in one)
            guard = {t["name"]: t["y"] for t in await traces(page, "chart-guardrails")}
            assert guard == {"pii_email": [0.4], "prompt_injection": [0.2], "block rate": [0.2], "redact rate": [0.4]}

            # latency and cost: 20 requests over 20 minutes, two 10-minute buckets of 10
            latency = {t["name"]: t["y"] for t in await traces(page, "chart-latency")}
            assert latency["chat p99"] == [100, 200] and latency["chat p50"] == [60, 160]
            cost = {t["name"]: t["y"] for t in await traces(page, "chart-cost")}
            assert cost["chat tokens"] == [150, 150]
            assert cost["chat cost"] == [0.125, 0.125]

            # model timeline with the trigger that caused v2
            timeline = {t["name"]: t for t in await traces(page, "chart-timeline")}
            assert timeline["canary"]["y"] == ["chat@v2", "chat@v1"]  # newest version first
            assert timeline["retrain trigger"]["x"] == [seeded.trigger.ts_ms]
            assert timeline["retrain trigger"]["y"] == ["chat@v2"]
            assert seeded.trigger.reason in await page.text_content("#triggers")
            assert await page.locator("#alerts tbody tr").count() == 3
            for chart in ("quality", "drift", "guardrails", "latency", "cost", "timeline"):
                assert await page.locator(f"#chart-{chart} .main-svg").count() > 0, chart
            assert await page.locator("#chart-drift .point").count() == 3

            # canary vs active: v2's two arms side by side with the monitor's latest decision
            canary = page.locator("#canaries tr[data-canary='chat@v2']")
            assert await canary.count() == 2
            assert await canary.first.get_attribute("data-arm") == "canary"
            assert "wait" in await canary.first.text_content()
            assert "too few requests" in await canary.first.text_content()
            assert "v1" in await canary.nth(1).text_content()  # the active arm names the active version

            # rollback of the canary: the click reaches the API, which publishes the request
            await page.click("#versions button[data-action='rollback'][data-version='v2']")
            await page.wait_for_function(
                "document.getElementById('action-result').textContent.includes('requested')", timeout=15_000)
            [event] = [e for e in gw.published if isinstance(e, ModelEvent)]
            assert (event.model, event.version_id, event.state, event.previous_state, event.actor) == (
                "chat", "v2", "rollback_requested", "canary", key_id)
            assert event.event_id in await page.text_content("#action-result")

            # auto-refresh keeps going (refresh_s is 2 in this gateway)
            before = await page.evaluate("Number(document.body.dataset.refreshes)")
            await page.wait_for_function(f"Number(document.body.dataset.refreshes) > {before}", timeout=15_000)

            # a narrower window for the screenshot, so the seeded hour is readable
            before = await page.evaluate("Number(document.body.dataset.refreshes)")
            await page.select_option("#since", "6h")
            await page.wait_for_function(f"Number(document.body.dataset.refreshes) > {before}", timeout=15_000)
            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "dashboard.png")
            assert shot.stat().st_size > 10_000
            assert problems == []
        finally:
            await browser.close()
    await store.query(f"DROP DATABASE IF EXISTS {store.database}")


async def test_a_refused_key_stops_the_dashboard_and_says_why(keystore: KeyStore, tmp_path: Path):
    store = await new_store()
    async with admin_gateway(store, keystore, report_dir=None) as gw, async_playwright() as pw:
        _, infer_key = gw.key("acme", ("infer",))
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(f"{gw.http}/admin/dashboard/")
            await page.fill("#key", infer_key)
            await page.click("#connect")
            await page.wait_for_function("document.getElementById('status').classList.contains('error')",
                                         timeout=15_000)
            assert "key refused" in await page.text_content("#status")
            assert await page.evaluate("window.servoloopDashboard.timer") is None
        finally:
            await browser.close()
    await store.query(f"DROP DATABASE IF EXISTS {store.database}")
