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
from gateway.server import Gateway
from tests.gateway.conftest import RunningGateway, store_following_gateway

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

    def registry_routes(gw: Gateway) -> None:
        gw.http_extensions.append(models_extension(store, gw.auth.authenticate, publish=pipeline.sink.publish))

    async with store_following_gateway(keystore, tiny_model_dir, transformers_engine, store, tmp_path / "adapters",
                                       model=MODEL, events=pipeline.sink, extend=registry_routes) as running:
        yield running
    await pipeline.aclose()


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
