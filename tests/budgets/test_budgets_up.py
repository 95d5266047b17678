"""Budgets as `servoloop up` wires them (servoloop/up.py `System`): spend priced by the monitors' price table,
a budget set over the admin API travels the event path into the store, the gateway's poll enforces it, and the
soft-limit alert lands in the store once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback.budgets import alert_rows
from feedback.monitors.settings import MonitorSettings, PriceSettings
from feedback.pipeline import EventPipeline
from feedback.settings import EventSettings, IngestSettings
from feedback.store import Store, inferences_in_window
from gateway.auth import KeyStore
from gateway.settings import BudgetSettings, GatewaySettings, ModelSettings, RateLimitSettings
from retrain.settings import RetrainSettings
from servoloop.settings import Settings
from servoloop.up import System
from tests.budgets.conftest import CHAT
from tests.support.openai_upstream import RunningUpstream


@pytest.fixture
async def system(upstream: RunningUpstream, store: Store, tmp_path: Path) -> AsyncIterator[System]:
    upstream.behaviour.tokens = 8
    events = EventSettings(broker={"mode": "none"}, ingest=IngestSettings(batch_max_wait_s=0.05))  # type: ignore[arg-type]
    settings = Settings(
        data_dir=tmp_path,
        events=events,
        gateway=GatewaySettings(
            host="127.0.0.1", http_port=0, grpc_port=0,
            models=[ModelSettings(name="remote", engine="remote", url=upstream.url)],
            rate_limits=RateLimitSettings(requests_per_minute=0, tokens_per_minute=0, max_concurrent_streams=0),
            budgets=BudgetSettings(poll_interval_s=0.2)),
        monitors=MonitorSettings(enabled=False, prices={"remote": PriceSettings(input_per_1k=200, output_per_1k=1000)}),
        retrain=RetrainSettings(enabled=False),
        grading={"enabled": False},  # type: ignore[arg-type]
    )
    up = System(settings, lambda registry: EventPipeline(events, data_dir=tmp_path / "events", registry=registry,
                                                         store=store))
    await up.start()
    yield up
    await up.stop()


async def _until(check, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s * 20)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_a_budget_set_over_the_admin_api_is_enforced_by_the_running_system(system: System, store: Store,
                                                                                  tmp_path: Path) -> None:
    assert system.server is not None and system.gateway is not None and system.gateway.budgets is not None
    keys = KeyStore(tmp_path / "keys.sqlite")
    _, admin = keys.create("ops", ["admin"])
    _, key = keys.create("up-co", ["infer"])
    system.gateway.auth.reload()
    base = f"http://127.0.0.1:{system.server.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        r = await c.post("/admin/v1/budgets", headers={"Authorization": f"Bearer {admin}"},
                         json={"subject": "up-co", "period": "day", "soft_usd": 4, "hard_usd": 9})
        assert r.status_code == 202, r.text
        keeper = system.gateway.budgets

        async def in_force() -> bool:
            return bool(keeper.budgets())

        await _until(in_force)  # sink -> store -> the gateway's poll
        chat = {"headers": {"Authorization": f"Bearer {key}"}, "json": CHAT}
        assert [(await c.post("/v1/chat/completions", **chat)).status_code for _ in range(2)] == [200, 200]
        refused = await c.post("/v1/chat/completions", **chat)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"

        async def stored() -> bool:
            return len(await inferences_in_window(store, start_ms=0, end_ms=2**41, tenant="up-co")) == 2

        await _until(stored)
        rows = await inferences_in_window(store, start_ms=0, end_ms=2**41, tenant="up-co")
        assert [e.cost_usd for e in rows] == [5.0, 5.0]  # (5 x 200 + 4 x 1000) / 1000

        async def alerted() -> bool:
            return len(await alert_rows(store, 0, tenant="up-co")) >= 2

        await _until(alerted)  # one per limit crossed
        assert sorted((a.level, a.spend_usd) for a in await alert_rows(store, 0, tenant="up-co")) == [
            ("hard", 10.0), ("soft", 5.0)]
        shown = (await c.get("/admin/v1/budgets", headers={"Authorization": f"Bearer {admin}"})).json()["budgets"]
        assert [(b["subject"], b["spend_usd"], b["state"]) for b in shown] == [("up-co", 10.0, "hard")]
