"""Clients pinned to a version (`model@version`): served while it serves; once retired or decommissioned, a clear
error naming its successor (HTTP 404 `version_retired`, gRPC NOT_FOUND). Real registry rows on chDB, a gateway
following them by polling the store, the Transformers engine on the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback.store import Store
from gateway.auth import KeyStore
from gateway.engines import Engine
from gateway.pins import pinned_states, split_pinned
from retrain.registry import StoreRegistry
from retrain.release.retire import retire_version
from servoloop.up import _model_events
from tests.gateway.conftest import RunningGateway, store_following_gateway
from tests.gateway.hotswap_support import Adapter


@pytest.fixture
async def gateway(keystore: KeyStore, tiny_model_dir: Path, transformers_engine: Engine, store: Store,
                  tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with store_following_gateway(keystore, tiny_model_dir, transformers_engine, store,
                                       tmp_path / "adapters") as running:
        yield running


async def _ask(gw: RunningGateway, key: str, model: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{gw.http}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": model, "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0})


async def _until(gw: RunningGateway, key: str, version: str) -> None:
    for _ in range(200):
        r = await _ask(gw, key, "tiny")
        if r.status_code == 200 and r.headers["x-servoloop-model-version"] == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never served {version}")


def test_split_pinned_only_splits_served_model_names():
    assert split_pinned("tiny@v1", ["tiny"]) == ("tiny", "v1")
    assert split_pinned("tiny", ["tiny"]) == ("tiny", None)
    assert split_pinned("a@b", ["a@b"]) == ("a@b", None)  # a served name containing '@' stays whole
    assert split_pinned("other@v1", ["tiny"]) == ("other@v1", None)  # unknown model: the usual not-found
    assert split_pinned("tiny@", ["tiny"]) == ("tiny@", None)


async def test_a_client_pinned_to_a_retired_version_gets_an_error_naming_its_successor(
        gateway: RunningGateway, store: Store, lora_adapters: dict[str, Adapter], tmp_path: Path) -> None:
    key = gateway.key()
    registry = StoreRegistry(store, tmp_path / "artifacts")
    for vid in ("v1", "v2"):
        await registry.register_candidate(model="tiny", base_model="tiny-chat", adapter_dir=lora_adapters[vid].path,
                                          lineage={}, actor="test", version_id=vid)
    await registry.promote("tiny", "v1", actor="test")
    await _until(gateway, key, "v1")
    r = await _ask(gateway, key, "tiny@v1")
    assert r.status_code == 200 and r.headers["x-servoloop-model-version"] == "v1", r.text
    assert r.json()["model"] == "tiny"  # the answer names the model, the header the version

    await registry.promote("tiny", "v2", actor="test")  # v1 retired, superseded by v2
    await _until(gateway, key, "v2")
    r = await _ask(gateway, key, "tiny@v1")
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "version_retired" and "use its successor tiny@v2" in err["message"]
    assert "is retired and no longer served" in err["message"]

    await retire_version(registry, "tiny", "v1", actor="ops", serving_window_s=0)
    for _ in range(100):  # the gateway learns of the decommission by polling
        if gateway.gw.router.versions.get(("tiny", "v1")) and gateway.gw.router.versions[("tiny", "v1")].state == \
                "decommissioned":
            break
        await asyncio.sleep(0.05)
    err = (await _ask(gateway, key, "tiny@v1")).json()["error"]
    assert err["code"] == "version_retired" and "is decommissioned" in err["message"] and "tiny@v2" in err["message"]
    unknown = await _ask(gateway, key, "tiny@v9")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "version_not_found"
    ok = await _ask(gateway, key, "tiny@v2")
    assert ok.status_code == 200 and ok.headers["x-servoloop-model-version"] == "v2"

    # the fold itself, read from the store
    states = pinned_states(await _model_events(store))
    assert states[("tiny", "v1")].successor == "v2" and states[("tiny", "v2")].state == "active"
