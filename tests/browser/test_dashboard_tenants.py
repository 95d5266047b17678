"""The dashboard's tenant selector in headless Chromium: picking a tenant redraws quality, drift, spend and the
version timeline with that tenant's seeded values only; a tenant's own admin key sees nothing else."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from playwright.async_api import Page, async_playwright

from feedback.store import write_events
from gateway.auth import KeyStore
from schemas.events import (
    BudgetAlert,
    BudgetEvent,
    Event,
    InferenceEvent,
    ModelEvent,
    MonitorResult,
    period_bounds,
)
from tests.browser.dashboard_support import admin_gateway, new_store
from tests.browser.test_dashboard import ARTIFACTS, CHROMIUM, traces

MINUTE = 60_000
# per tenant: thumbs-up rate of three windows, drift score, spend per request, its version
SEEDS = {"acme": ([0.9, 0.85, 0.8], 0.12, 0.25, "acme-v1"), "beta": ([0.3, 0.35, 0.4], 0.77, 1.5, "beta-v1")}


def seed(base: int) -> list[Event]:
    events: list[Event] = [ModelEvent(ts_ms=base, model="chat", version_id="global-v1", state="active")]
    for tenant, (quality, drift, cost, version) in SEEDS.items():
        for i, value in enumerate(quality):
            end = base + (i + 1) * 10 * MINUTE
            events.append(MonitorResult(tenant=tenant, ts_ms=end, monitor="satisfaction", metric="thumbs_up_rate",
                                        model="chat", model_version="base", window_start_ms=end - 10 * MINUTE,
                                        window_end_ms=end, value=value, sample_size=100,
                                        details=json.dumps({"monitor_kind": "quality"})))
        events.append(MonitorResult(tenant=tenant, ts_ms=base + 35 * MINUTE, monitor="request_drift",
                                    metric="dataset_drift", model="chat", model_version="base",
                                    window_start_ms=base, window_end_ms=base + 35 * MINUTE, value=drift,
                                    threshold=0.5, sample_size=500, details=json.dumps({"monitor_kind": "drift"})))
        for i in range(4):
            events.append(InferenceEvent(tenant=tenant, ts_ms=base + i * MINUTE, model="chat", tokens_in=10,
                                         tokens_out=5, latency_ms=20.0, cost_usd=cost))
        events.append(ModelEvent(tenant=tenant, ts_ms=base + 40 * MINUTE, model="chat", version_id=version,
                                 state="candidate", reason=f"trained on {tenant}'s feedback"))
    month_start, reset = period_bounds("month", base / 1000)
    events += [BudgetEvent(scope="tenant", subject="beta", tenant="beta", period="month", soft_usd=5, hard_usd=100),
               BudgetAlert(tenant="beta", ts_ms=base + 3 * MINUTE, scope="tenant", subject="beta", period="month",
                           level="soft", period_start_ms=month_start, reset_ms=reset, spend_usd=6.0, limit_usd=5.0)]
    return events


async def pick(page: Page, tenant: str) -> None:
    before = await page.evaluate("Number(document.body.dataset.refreshes || 0)")
    await page.select_option("#tenant", tenant)
    await page.wait_for_function(
        f"document.body.dataset.tenant === {tenant!r} && Number(document.body.dataset.refreshes) > {before}",
        timeout=30_000)


async def quality(page: Page) -> list[tuple[str, list[float]]]:
    return [(t["name"], t["y"]) for t in await traces(page, "chart-quality") if t["meta"] and "band" not in t["meta"]]


async def test_selecting_a_tenant_redraws_every_chart_with_that_tenants_values(keystore: KeyStore, tmp_path: Path):
    store = await new_store()
    now = time.time_ns() // 1_000_000
    base = now - 50 * MINUTE
    await write_events(store, seed(base))
    async with admin_gateway(store, keystore, report_dir=None) as gw, async_playwright() as pw:
        _, operator = gw.key("ops", ("admin",))
        _, acme_admin = gw.key("acme", ("admin",))
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        problems: list[str] = []
        try:
            page = await browser.new_page(viewport={"width": 1500, "height": 1000})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            await page.goto(f"{gw.http}/admin/dashboard/")
            await page.fill("#key", operator)
            await page.click("#connect")
            await page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1", timeout=30_000)
            options = await page.eval_on_selector_all("#tenant option", "os => os.map((o) => o.value)")
            assert options == ["", "acme", "beta"]

            # every tenant: both quality series, spend per tenant plotted side by side
            assert sorted(y for _, y in await quality(page)) == sorted(q for q, _, _, _ in SEEDS.values())
            spend = {t["name"]: t["y"] for t in await traces(page, "chart-spend")}
            assert set(spend) == {"acme", "beta"}
            assert sum(spend["acme"]) == 4 * 0.25 and sum(spend["beta"]) == 4 * 1.5

            for tenant, (values, drift, cost, version) in SEEDS.items():
                await pick(page, tenant)
                assert [y for _, y in await quality(page)] == [values]
                [bars] = await traces(page, "chart-drift")
                assert (bars["x"], bars["y"]) == (["dataset_drift"], [drift])
                spend = {t["name"]: t["y"] for t in await traces(page, "chart-spend")}
                assert list(spend) == [tenant] and sum(spend[tenant]) == 4 * cost
                versions = {y for t in await traces(page, "chart-timeline") for y in t["y"]}
                assert versions == {f"chat@{version}", "chat@global-v1"}
                budgets = page.locator("#budgets tbody tr[data-budget]")
                if tenant == "beta":
                    assert await budgets.count() == 1
                    assert "tenant beta" in await budgets.first.text_content()
                    assert await budgets.first.get_attribute("class") == "budget-soft"  # 6.0 spent of soft 5
                    assert await page.locator("#budget-alerts tbody tr[data-alert='soft']").count() == 1
                else:
                    assert await budgets.count() == 0
                    assert await page.locator("#budget-alerts tbody tr").count() == 0
            shot = tmp_path / "dashboard-tenant.png"
            await page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "dashboard-tenant.png")

            await pick(page, "")  # back to every tenant
            assert len(await quality(page)) == 2

            # acme's own admin key: the selector holds acme alone, and no chart shows beta
            own = await browser.new_page(viewport={"width": 1500, "height": 1000})
            own.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            await own.goto(f"{gw.http}/admin/dashboard/")
            await own.fill("#key", acme_admin)
            await own.click("#connect")
            await own.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1", timeout=30_000)
            assert await own.eval_on_selector_all("#tenant option", "os => os.map((o) => o.value)") == ["acme"]
            assert await own.is_disabled("#tenant")
            assert [y for _, y in await quality(own)] == [SEEDS["acme"][0]]
            assert [t["name"] for t in await traces(own, "chart-spend")] == ["acme"]
            assert "beta" not in await own.content()
            assert problems == []
        finally:
            await browser.close()
    await store.query(f"DROP DATABASE IF EXISTS {store.database}")
