"""The gateway's fold of model events against the real registry's rows, and hot swap by polling the store.

`StoreRegistry` writes the lifecycle rows (candidate, canary, promotion with the base retired, rollback with the
previous version re-activated); the gateway reads them back from the store through `servoloop up`'s poll source
(the fallback when there is no broker) and serves what they say.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback.store import Store
from gateway.auth import KeyStore
from gateway.canary import Arm, ModelRouting, routing_from_events
from gateway.engines import Engine
from retrain.registry import StoreRegistry
from schemas.events import Event, ModelEvent
from servoloop.up import _model_events
from tests.gateway.conftest import RunningGateway, store_following_gateway
from tests.gateway.hotswap_support import Adapter


async def test_the_fold_of_the_registrys_rows_follows_every_lifecycle_step(
        store: Store, lora_adapters: dict[str, Adapter], tmp_path: Path) -> None:
    published: list[Event] = []
    registry = StoreRegistry(store, tmp_path / "artifacts", publish=published.append)
    v1 = await registry.register_candidate(model="tiny", base_model="tiny-chat", adapter_dir=lora_adapters["v1"].path,
                                           lineage={}, actor="test", version_id="v1")
    arm = Arm("v1", v1.adapter_path, v1.artifact_sha256)

    async def routing() -> dict[str, ModelRouting]:
        from_store = routing_from_events(await _model_events(store))
        from_topic = routing_from_events(e for e in published if isinstance(e, ModelEvent))
        assert from_store == from_topic  # the store and the topic carry the same rows
        return from_store

    assert await routing() == {}  # a candidate serves nothing: the configured base does
    await registry.start_canary("tiny", "v1", share=0.2, actor="test")
    assert await routing() == {"tiny": ModelRouting(None, arm, 0.2)}
    await registry.promote("tiny", "v1", actor="test")
    assert await routing() == {"tiny": ModelRouting(arm)}
    await registry.rollback("tiny", "v1", actor="test")
    assert await routing() == {"tiny": ModelRouting(Arm("base"))}  # the base re-activated: no adapter


@pytest.fixture
async def polling_gateway(keystore: KeyStore, tiny_model_dir: Path, transformers_engine: Engine, store: Store,
                          tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with store_following_gateway(keystore, tiny_model_dir, transformers_engine, store,
                                       tmp_path / "adapters") as running:
        yield running


async def _version(gw: RunningGateway, key: str) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{gw.http}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers["x-servoloop-model-version"]


async def _until(gw: RunningGateway, key: str, version: str) -> None:
    for _ in range(200):
        if await _version(gw, key) == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never served {version}: {gw.gw.readiness()['hotswap']}")


async def test_without_a_broker_the_gateway_polls_the_store_and_follows_promote_and_rollback(
        polling_gateway: RunningGateway, store: Store, lora_adapters: dict[str, Adapter], tmp_path: Path) -> None:
    key = polling_gateway.key()
    registry = StoreRegistry(store, tmp_path / "artifacts")
    assert await _version(polling_gateway, key) == "base"
    await registry.register_candidate(model="tiny", base_model="tiny-chat", adapter_dir=lora_adapters["v1"].path,
                                      lineage={}, actor="test", version_id="v1")
    await registry.promote("tiny", "v1", actor="test")
    await _until(polling_gateway, key, "v1")
    await registry.rollback("tiny", "v1", actor="test")
    await _until(polling_gateway, key, "base")
    status = polling_gateway.gw.readiness()["hotswap"]
    assert status["source"] == "store" and status["state"] == "running" and status["failures"] == 0
