"""Gateways with spend budgets: a real OpenAI-protocol upstream (5 prompt tokens, up to 8 completion tokens per
answer), a real chDB store as the budgets' source, and a price table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

import pytest

from feedback.budgets import StoreBudgetSource
from feedback.dashboard import admin_extension
from feedback.dashboard.budgets_api import budgets_extension
from feedback.store import Store
from gateway.auth import KeyStore
from gateway.budgets import PriceTable
from gateway.engines import Engine
from gateway.engines.remote import RemoteEngine
from gateway.server import Gateway, GatewayServer
from gateway.settings import BudgetSettings, ModelSettings
from schemas.events import Event
from tests.gateway.conftest import RunningGateway, settings_for, upstream  # noqa: F401
from tests.support.openai_upstream import RunningUpstream

# 0.2 per prompt token, 1.0 per completion token: a 5 + 4 token answer costs exactly 5.0
PRICES = {"remote": (200.0, 1000.0)}
CHAT = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COST = 5.0

MakeGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_gateway(keystore: KeyStore, upstream: RunningUpstream,  # noqa: F811
                       store: Store) -> AsyncIterator[MakeGateway]:
    """Start gateways over `store` (each stopped at the end); `clock` replaces the budgets' wall clock."""
    running: list[tuple[GatewayServer, Engine]] = []
    upstream.behaviour.tokens = 8

    async def make(*, clock: Callable[[], float] | None = None, poll_interval_s: float = 60.0,
                   budgets: bool = True) -> RunningGateway:
        ms = ModelSettings(name="remote", engine="remote", url=upstream.url)
        engine = RemoteEngine(ms)
        await engine.start()
        settings = settings_for([ms], budgets=BudgetSettings(poll_interval_s=poll_interval_s, startup_wait_s=10))
        events: list[Event] = []
        gw = Gateway(settings, keystore, engines={"remote": engine}, events=SimpleNamespace(publish=events.append),
                     prices=PriceTable(PRICES))
        # the admin API as `servoloop up` mounts it: what it publishes lands in `events` like the gateway's own
        gw.http_extensions.append(admin_extension(store, gw.auth.authenticate, publish=events.append,
                                                  prices=PRICES))
        gw.http_extensions.append(budgets_extension(store, gw.auth.authenticate, publish=events.append))
        if budgets:
            keeper = gw.follow_budgets(StoreBudgetSource(store))
            if clock is not None:
                keeper.clock = clock
        server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
        await server.start()
        running.append((server, engine))
        gateway = RunningGateway(server, keystore, events=events)
        server.gw.service.add_observer(gateway.outcomes.append)
        return gateway

    yield make
    for server, engine in running:
        await server.stop()
        await engine.aclose()
