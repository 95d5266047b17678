"""`servoloop serve` as a replica of a multi-process deployment (servoloop/up.py `replica`): events to an
external broker (real tansu), and the store read as a ClickHouse server over HTTP (clickhouse-connect
against the test endpoint in front of chDB). A replica enforces spend budgets from the store, accepts
feedback on inferences another replica served, and runs none of the store owner's workers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from feedback.broker import EmbeddedBroker
from feedback.monitors.settings import MonitorSettings, PriceSettings
from feedback.settings import EventSettings
from feedback.store import Store, write_events
from gateway.auth import KeyStore
from gateway.settings import BudgetSettings, GatewaySettings, ModelSettings, RateLimitSettings
from retrain.settings import RetrainSettings
from schemas.events import BudgetEvent, InferenceEvent
from servoloop.settings import Settings
from servoloop.up import System, replica
from tests.gateway.conftest import upstream  # noqa: F401
from tests.support.clickhouse_http import shared_endpoint
from tests.support.openai_upstream import RunningUpstream

CHAT = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _settings(tmp_path: Path, bootstrap: str, database: str, *, store_kind: str = "clickhouse") -> Settings:
    events = EventSettings(  # type: ignore[arg-type]
        broker={"mode": "external", "bootstrap_servers": bootstrap, "topic_prefix": f"r{uuid.uuid4().hex[:8]}."},
        store={"kind": store_kind, "url": shared_endpoint().url, "database": database})
    return Settings(
        data_dir=tmp_path, events=events,
        gateway=GatewaySettings(
            host="127.0.0.1", http_port=0, grpc_port=0,
            models=[ModelSettings(name="remote", engine="remote", url="http://127.0.0.1:1/v1")],
            rate_limits=RateLimitSettings(requests_per_minute=0, tokens_per_minute=0, max_concurrent_streams=0),
            budgets=BudgetSettings(poll_interval_s=0.2)),
        # 0.2 per prompt token, 1.0 per completion token
        monitors=MonitorSettings(enabled=True, prices={"remote": PriceSettings(input_per_1k=200, output_per_1k=1000)}),
        retrain=RetrainSettings(enabled=True),
        grading={"enabled": True},  # type: ignore[arg-type]
    )


@pytest.fixture
async def started(tmp_path: Path, broker: EmbeddedBroker, upstream: RunningUpstream,  # noqa: F811
                  store: Store) -> AsyncIterator[Callable[..., Awaitable[System]]]:
    upstream.behaviour.tokens = 8
    systems: list[System] = []  # `store` is this process's chDB; the replica reaches the same database over HTTP

    async def start(**kw: str) -> System:
        settings = _settings(tmp_path, broker.bootstrap_servers, store.database, **kw)
        settings.gateway.models[0].url = upstream.url
        system = replica(settings)
        await system.start()
        systems.append(system)
        return system

    yield start
    for system in systems:
        await system.stop()


async def _until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s * 20)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_a_replica_enforces_budgets_read_from_a_clickhouse_store(started: Callable[..., Awaitable[System]],
                                                                      store: Store, tmp_path: Path) -> None:
    system = await started()
    # the store owner's work is not a replica's, even with monitors, retraining and grading switched on
    assert system.scheduler is None and system.registry is None and system.retrain_worker is None
    assert system.grading is None and system.model_requests is None
    gw = system.gateway
    assert gw is not None and gw.budgets is not None and system.server is not None
    keys = KeyStore(tmp_path / "keys.sqlite")
    _, key = keys.create("rep-co", ["infer", "feedback"])
    gw.auth.reload()

    # written by the store's owner (the admin API of `servoloop up` does this through the ingester)
    await write_events(store, [BudgetEvent(scope="tenant", subject="rep-co", tenant="rep-co", period="day",
                                                 hard_usd=9)])
    await _until(lambda: bool(gw.budgets and gw.budgets.budgets()))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.server.http_port}", timeout=30) as c:
        auth = {"Authorization": f"Bearer {key}"}
        # each answer costs 5 x 0.2 + 4 x 1.0 = 5.0: the first two pass (0, then 5 < 9), the third is refused
        codes = [(await c.post("/v1/chat/completions", headers=auth, json=CHAT)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        refused = await c.post("/v1/chat/completions", headers=auth, json=CHAT)
        assert refused.json()["error"]["code"] == "budget_exceeded" and int(refused.headers["retry-after"]) > 0

        # feedback on an inference another replica served: the replica finds it in the store
        other = InferenceEvent(tenant="rep-co", model="remote", response="served elsewhere")
        await write_events(store, [other])
        r = await c.post("/v1/feedback", headers=auth, json={"target_id": other.event_id, "thumbs": True})
        assert r.status_code == 201, r.text


async def test_a_replica_over_an_embedded_store_serves_without_budgets(started: Callable[..., Awaitable[System]],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="servoloop.up"):
        system = await started(store_kind="chdb")  # chDB belongs to one process: a replica opens no store
    assert system.pipeline is not None and system.pipeline.store is None
    assert system.gateway is not None and system.gateway.budgets is None
    assert "budgets are not enforced" in caplog.text
