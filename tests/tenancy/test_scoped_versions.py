"""Scoped versions: per (model, tenant) one active and one canary, promotion and rollback within the scope, and
per-request routing that takes the tenant's version and falls back to the global one. Real registry on chDB."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback.store import Store
from gateway.canary import routing_from_events, tenant_routings_from_events
from gateway.router import Arms, ModelRoute, Router, TenantArms
from retrain.lifecycle import IllegalTransition
from retrain.registry import StoreRegistry, list_versions, model_rows, served_versions
from schemas.errors import InvalidRequest
from schemas.events import ModelEvent

MODEL = "chat"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the registry accepts as a PEFT adapter (it copies and hashes it; nothing loads it here)."""
    d = tmp_path_factory.mktemp("adapter")
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


async def _events(store: Store) -> list[ModelEvent]:
    return [ModelEvent(**{**r, "canary_share": float(r["canary_share"] or 0.0)}) for r in await model_rows(store)]


async def test_each_tenant_has_its_own_active_version_and_rollback_falls_back_to_the_global_one(
        store: Store, tmp_path: Path, adapter: Path) -> None:
    reg = StoreRegistry(store, tmp_path / "artifacts")
    g1 = await reg.register_candidate(model=MODEL, base_model="tiny", adapter_dir=adapter, lineage={}, actor="t",
                                      version_id="g1")
    a1 = await reg.register_candidate(model=MODEL, base_model="tiny", adapter_dir=adapter, lineage={}, actor="t",
                                      version_id="a1", tenant="acme")
    await reg.register_candidate(model=MODEL, base_model="tiny", adapter_dir=adapter, lineage={}, actor="t",
                                 version_id="a2", tenant="acme")
    b1 = await reg.register_candidate(model=MODEL, base_model="tiny", adapter_dir=adapter, lineage={}, actor="t",
                                      version_id="b1", tenant="bolt")
    assert (g1.tenant, a1.tenant, b1.tenant) == ("", "acme", "bolt") and a1.lineage["tenant"] == "acme"

    await reg.promote(MODEL, "g1", actor="ops")
    await reg.promote(MODEL, "a1", actor="ops")
    await reg.promote(MODEL, "b1", actor="ops")
    assert (await reg.active(MODEL)).version_id == "g1"  # type: ignore[union-attr]
    assert (await reg.active(MODEL, "acme")).version_id == "a1"  # type: ignore[union-attr]
    assert (await reg.active(MODEL, "bolt")).version_id == "b1"  # type: ignore[union-attr]
    assert await reg.active(MODEL, "nobody") is None

    await reg.promote(MODEL, "a2", actor="ops")  # retires acme's a1 only
    states = {v.version_id: v.state for v in await reg.versions(MODEL)}
    assert states == {"base": "retired", "g1": "active", "a1": "retired", "a2": "active", "b1": "active"}

    await reg.rollback(MODEL, "a2", actor="ops")  # acme goes back to a1, not to anyone else's version
    assert (await reg.active(MODEL, "acme")).version_id == "a1"  # type: ignore[union-attr]
    await reg.rollback(MODEL, "b1", actor="ops")  # bolt had nothing before: it falls back to the global g1
    assert await reg.active(MODEL, "bolt") is None
    assert (await reg.active(MODEL)).version_id == "g1"  # type: ignore[union-attr]

    routing = routing_from_events(await _events(store))
    assert routing[MODEL].active.version == "g1"  # type: ignore[union-attr]
    tenants = tenant_routings_from_events(await _events(store))
    assert set(tenants) == {(MODEL, "acme")} and tenants[(MODEL, "acme")].active.version == "a1"  # type: ignore[union-attr]

    acme = await list_versions(store, MODEL, "acme")
    assert [v.version_id for v in acme] == ["a1", "a2"]
    with_global = await list_versions(store, MODEL, "bolt", with_global=True)
    assert sorted(v.version_id for v in with_global) == ["b1", "base", "g1"]
    assert served_versions(with_global, "bolt") == {"active": "g1", "canary": None}
    assert served_versions(await list_versions(store, MODEL, "acme", with_global=True), "acme")["active"] == "a1"


async def test_canaries_run_per_tenant_and_a_second_one_in_a_scope_is_refused(
        store: Store, tmp_path: Path, adapter: Path) -> None:
    reg = StoreRegistry(store, tmp_path / "artifacts")
    for vid, tenant in (("g1", ""), ("a1", "acme"), ("a2", "acme"), ("b1", "bolt")):
        await reg.register_candidate(model=MODEL, base_model="tiny", adapter_dir=adapter, lineage={}, actor="t",
                                     version_id=vid, tenant=tenant)
    await reg.start_canary(MODEL, "g1", share=0.5, actor="ops")
    await reg.start_canary(MODEL, "a1", share=0.25, actor="ops")  # acme's canary beside the global one
    await reg.start_canary(MODEL, "b1", share=1.0, actor="ops")
    with pytest.raises(IllegalTransition, match="for tenant 'acme' already has a canary"):
        await reg.start_canary(MODEL, "a2", share=0.1, actor="ops")
    assert (await reg.canary(MODEL, "acme")).version_id == "a1"  # type: ignore[union-attr]
    assert (await reg.canary(MODEL)).version_id == "g1"  # type: ignore[union-attr]
    tenants = tenant_routings_from_events(await _events(store))
    assert tenants[(MODEL, "acme")].canary.version == "a1" and tenants[(MODEL, "acme")].active is None  # type: ignore[union-attr]
    assert tenants[(MODEL, "acme")].canary_share == 0.25
    with pytest.raises(InvalidRequest, match="tenant"):
        await reg.register_candidate(model=MODEL, base_model="tiny", adapter_dir=adapter, lineage={}, actor="t",
                                     tenant="bad tenant!")


def test_a_request_takes_its_tenants_route_and_falls_back_to_the_global_one() -> None:
    engine = object()
    base = ModelRoute(MODEL, engine, version="base")  # type: ignore[arg-type]
    router = Router([base])
    g1 = ModelRoute(MODEL, engine, version="g1", adapter="g1")  # type: ignore[arg-type]
    gc = ModelRoute(MODEL, engine, version="gc", adapter="gc", arm="canary")  # type: ignore[arg-type]
    a1 = ModelRoute(MODEL, engine, version="a1", adapter="a1")  # type: ignore[arg-type]
    bc = ModelRoute(MODEL, engine, version="bc", adapter="bc", arm="canary")  # type: ignore[arg-type]
    router.swap(MODEL, Arms(g1, gc, 0.5))
    router.swap_tenant(MODEL, "acme", TenantArms(a1))
    router.swap_tenant(MODEL, "bolt", TenantArms(None, bc, 1.0))
    keys = [f"k:{i}" for i in range(200)]
    assert {router.select(MODEL, k, "acme").version for k in keys} == {"a1"}  # its own active, no global canary
    assert {router.select(MODEL, k, "bolt").version for k in keys} == {"bc"}  # its own canary at 100%
    assert {router.select(MODEL, k, "other").version for k in keys} == {"g1", "gc"}  # the global split
    assert {router.select(MODEL, k).version for k in keys} == {"g1", "gc"}
    router.swap_tenant(MODEL, "acme", None)
    assert router.tenants(MODEL) == ["bolt"]
    assert {router.select(MODEL, k, "acme").version for k in keys} == {"g1", "gc"}
