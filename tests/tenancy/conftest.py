"""Fixtures of the tenancy tests: a serving gateway following the store's model events, and the registry's
admin routes on it; real tiny model, real chDB, real Transformers engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback.dashboard.models_api import models_extension
from feedback.pipeline import EventPipeline
from feedback.settings import EventSettings, IngestSettings
from feedback.store import Store
from gateway.auth import KeyStore
from gateway.engines import Engine
from gateway.server import Gateway, GatewayServer
from gateway.settings import HotSwapSettings, ModelSettings
from servoloop.up import _model_events
from tests.gateway.conftest import RunningGateway, settings_for

MODEL = "tiny-chat"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the seeded feedback window
DAY = 86_400_000


@pytest.fixture
async def serving(keystore: KeyStore, tiny_model_dir: Path, transformers_engine: Engine, store: Store,
                  tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """A gateway on the shared Transformers engine: events into `store`, versions from it, registry routes on."""
    pipeline = EventPipeline(EventSettings(broker={"mode": "none"}, ingest=IngestSettings(batch_max_wait_s=0.1)),
                             data_dir=tmp_path / "events", store=store)
    await pipeline.start()
    settings = settings_for([ModelSettings(name=MODEL, path=str(tiny_model_dir))],
                            hotswap=HotSwapSettings(poll_interval_s=0.1, drain_timeout_s=5.0))
    gw = Gateway(settings, keystore, engines={MODEL: transformers_engine}, events=pipeline.sink)

    async def rows() -> list:  # type: ignore[type-arg]
        return await _model_events(store)

    gw.follow_models(cache_dir=tmp_path / "adapters", poll=rows)
    gw.http_extensions.append(models_extension(store, gw.auth.authenticate, publish=pipeline.sink.publish))
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    yield RunningGateway(server, keystore)
    await server.stop()
    await pipeline.aclose()
    for name in list(getattr(transformers_engine, "_adapters", {})):  # leave the shared engine as it was
        await transformers_engine.unload_adapter(name)


async def ask(gw: RunningGateway, key: str, content: str = "How do I reset my password?") -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{gw.http}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                  "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    return r


async def served_version(gw: RunningGateway, key: str, want: str, *, tries: int = 200) -> str:
    """The version a key's requests are served, polled until it is `want` (the gateway follows the store)."""
    got = ""
    for _ in range(tries):
        got = (await ask(gw, key)).headers["x-servoloop-model-version"]
        if got == want:
            break
        await asyncio.sleep(0.1)
    return got
