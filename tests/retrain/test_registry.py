"""The registry on real chDB: lifecycle rules, one active and one canary per model, rollback, artifacts, requests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from feedback.store import Store
from retrain.lifecycle import STATES, TRANSITIONS, IllegalTransition, Registry, next_state
from retrain.registry import (
    BASE_VERSION,
    REQUEST_REFUSED,
    StoreRegistry,
    VersionExists,
    model_rows,
    new_version_id,
)
from retrain.requests import RequestWorker, request_event, unanswered_requests
from schemas.artifacts import fetch_verified, tree_sha256
from schemas.errors import InvalidRequest, NotFound
from schemas.events import Event, ModelEvent

MODEL = "chat"
BASE = "tiny-chat"


@pytest.fixture
def published() -> list[Event]:
    return []


@pytest.fixture
def registry(store: Store, tmp_path: Path, published: list[Event]) -> StoreRegistry:
    return StoreRegistry(store, tmp_path / "artifacts", publish=published.append)


async def register(reg: StoreRegistry, adapter: Path, version: str, **lineage: object):
    return await reg.register_candidate(model=MODEL, base_model=BASE, adapter_dir=adapter, lineage=dict(lineage),
                                        actor="trainer", version_id=version)


async def states(reg: StoreRegistry) -> dict[str, str]:
    return {v.version_id: v.state for v in await reg.versions(MODEL)}


async def test_store_registry_implements_the_registry_protocol(registry: StoreRegistry):
    assert isinstance(registry, Registry)


async def test_register_candidate_copies_the_adapter_hashes_it_and_records_lineage(
        registry: StoreRegistry, tiny_lora: Path, tmp_path: Path, published: list[Event], store: Store):
    v = await register(registry, tiny_lora, "v1", trigger_id="t-1", recipe={"method": "dpo", "beta": 0.1})
    assert v.state == "candidate" and v.base_model == BASE
    assert v.adapter_path == str(tmp_path / "artifacts" / MODEL / "v1")
    assert v.artifact_sha256 == tree_sha256(tiny_lora) == tree_sha256(v.adapter_path)
    assert (Path(v.adapter_path) / "adapter_model.safetensors").is_file()
    assert v.lineage["trigger_id"] == "t-1" and v.lineage["recipe"]["beta"] == 0.1
    assert v.lineage["artifact_sha256"] == v.artifact_sha256 and v.lineage["registered_by"] == "trainer"
    # the store holds the row first, the sink got the same event
    rows = await model_rows(store, MODEL)
    assert [(r["version_id"], r["state"], r["artifact_sha256"]) for r in rows] == [("v1", "candidate", v.artifact_sha256)]
    assert [e.event_id for e in published] == [rows[0]["event_id"]]
    # the gateway's verified fetch accepts it; tampering is caught
    assert fetch_verified(v.adapter_path, v.artifact_sha256, tmp_path / "cache") == Path(v.adapter_path)
    (Path(v.adapter_path) / "adapter_config.json").write_text("{}")
    with pytest.raises(Exception, match="hashes to"):
        fetch_verified(v.adapter_path, v.artifact_sha256, tmp_path / "cache")


async def test_register_to_an_fsspec_url_and_generated_ids(store: Store, tiny_lora: Path, tmp_path: Path):
    reg = StoreRegistry(store, "memory://servoloop-artifacts")
    v = await reg.register_candidate(model=MODEL, base_model=BASE, adapter_dir=tiny_lora, lineage={}, actor="t")
    assert v.version_id.startswith("v") and len(v.version_id) == len("v20261123-141500-ab12")
    assert v.adapter_path == f"memory://servoloop-artifacts/{MODEL}/{v.version_id}"
    local = fetch_verified(v.adapter_path, v.artifact_sha256, tmp_path / "cache")
    assert tree_sha256(local) == tree_sha256(tiny_lora)
    assert new_version_id(0) < new_version_id(10**12)  # sortable by time


async def test_registration_refuses_taken_ids_bad_ids_and_non_adapters(registry: StoreRegistry, tiny_lora: Path,
                                                                      tmp_path: Path):
    await register(registry, tiny_lora, "v1")
    with pytest.raises(VersionExists, match="already has a version 'v1'"):
        await register(registry, tiny_lora, "v1")
    with pytest.raises(VersionExists):
        await register(registry, tiny_lora, BASE_VERSION)
    with pytest.raises(InvalidRequest, match="version_id must be"):
        await register(registry, tiny_lora, "../etc")
    with pytest.raises(InvalidRequest, match="not a PEFT adapter"):
        await register(registry, tmp_path, "v2")


async def _version_in(reg: StoreRegistry, adapter: Path, state: str, n: int) -> str:
    """A fresh version driven into `state` by legal moves (other versions may change on the way)."""
    vid = f"s{n}"
    await register(reg, adapter, vid)
    path = {"candidate": [], "canary": ["canary"], "active": ["promote"], "rejected": ["reject"],
            "rolled_back": ["canary", "rollback"], "retired": ["promote", "*supersede"],
            "decommissioned": ["reject", "decommission"]}[state]
    for step in path:
        if step == "canary":
            await reg.start_canary(MODEL, vid, share=0.2, actor="t")
        elif step == "promote":
            await reg.promote(MODEL, vid, actor="t")
        elif step == "reject":
            await reg.reject(MODEL, vid, reasons=["bad"], actor="t")
        elif step == "rollback":
            await reg.rollback(MODEL, vid, actor="t")
        elif step == "decommission":
            await reg.decommission(MODEL, vid, actor="t")
        else:
            other = f"{vid}-next"
            await register(reg, adapter, other)
            await reg.promote(MODEL, other, actor="t")
    assert (await reg.get(MODEL, vid)).state == state
    return vid


async def test_every_state_and_action_pair_follows_the_transition_table(registry: StoreRegistry, tiny_lora: Path):
    actions = {
        "canary": lambda v: registry.start_canary(MODEL, v, share=0.1, actor="t"),
        "promote": lambda v: registry.promote(MODEL, v, actor="t"),
        "rollback": lambda v: registry.rollback(MODEL, v, actor="t"),
        "reject": lambda v: registry.reject(MODEL, v, reasons=["r"], actor="t"),
    }
    n = 0
    for state in STATES:
        for action, call in actions.items():
            # no canary running, so only the table decides
            if (c := await registry.canary(MODEL)) is not None:
                await registry.rollback(MODEL, c.version_id, actor="cleanup")
            n += 1
            vid = await _version_in(registry, tiny_lora, state, n)
            legal = state in TRANSITIONS[action]  # type: ignore[index]
            if legal:
                v = await call(vid)
                assert v.state == next_state(state, action)  # type: ignore[arg-type]
                assert (await registry.get(MODEL, vid)).state == v.state
            else:
                with pytest.raises(IllegalTransition) as err:
                    await call(vid)
                assert f"cannot {action} a version in state {state!r}" in err.value.message
                assert err.value.code == "illegal_transition" and err.value.details["state"] == state
                assert (await registry.get(MODEL, vid)).state == state  # nothing written


async def test_promote_retires_the_previous_active_and_rollback_reactivates_it(
        registry: StoreRegistry, tiny_lora: Path, store: Store, published: list[Event]):
    for v in ("v1", "v2", "v3"):
        await register(registry, tiny_lora, v)
    assert (await registry.active(MODEL)).version_id == BASE_VERSION  # type: ignore[union-attr]
    await registry.promote(MODEL, "v1", actor="alice")
    assert await states(registry) == {"base": "retired", "v1": "active", "v2": "candidate", "v3": "candidate"}
    await registry.start_canary(MODEL, "v2", share=0.25, actor="alice")
    assert (await registry.canary(MODEL)).canary_share == 0.25  # type: ignore[union-attr]
    await registry.promote(MODEL, "v2", actor="canary-monitor", reason="better", evidence={"p": 0.01})
    assert await states(registry) == {"base": "retired", "v1": "retired", "v2": "active", "v3": "candidate"}
    retired = [r for r in await model_rows(store, MODEL, "v1") if r["state"] == "retired"]
    assert retired[0]["reason"] == "superseded by v2" and retired[0]["previous_state"] == "active"
    v2 = await registry.get(MODEL, "v2")
    assert v2.lineage["promotion"]["by"] == "canary-monitor" and v2.lineage["promotion"]["evidence"] == {"p": 0.01}
    assert v2.lineage["canary"]["share"] == 0.25  # earlier steps are carried forward
    await registry.promote(MODEL, "v3", actor="bob")
    assert [v.version_id for v in await registry.versions(MODEL) if v.state == "active"] == ["v3"]

    # rollback of the active version: the most recently retired one (v2) comes back, then v1, then base
    rolled = await registry.rollback(MODEL, "v3", actor="bob", reason="complaints")
    assert rolled.state == "rolled_back"
    assert await states(registry) == {"base": "retired", "v1": "retired", "v2": "active", "v3": "rolled_back"}
    back = await registry.get(MODEL, "v2")
    assert back.reason == "re-activated: v3 rolled back" and back.lineage["reactivation"]["replaces"] == "v3"
    await registry.rollback(MODEL, "v2", actor="bob")
    assert (await registry.active(MODEL)).version_id == "v1"  # type: ignore[union-attr]
    await registry.rollback(MODEL, "v1", actor="bob")
    base = await registry.active(MODEL)
    assert base is not None and base.version_id == BASE_VERSION and base.adapter_path == "" and base.base_model == BASE
    # every row reached the sink in store order; the gateway sees exactly one active per step
    rows = await model_rows(store, MODEL)
    assert [e.event_id for e in published] == [r["event_id"] for r in rows]
    assert all(isinstance(e, ModelEvent) for e in published)
    with pytest.raises(IllegalTransition, match="base model takes no rollback"):
        await registry.rollback(MODEL, BASE_VERSION, actor="bob")


async def test_rollback_of_a_canary_only_ends_the_canary_and_one_canary_at_a_time(registry: StoreRegistry,
                                                                                 tiny_lora: Path):
    for v in ("v1", "v2", "v3"):
        await register(registry, tiny_lora, v)
    await registry.promote(MODEL, "v1", actor="a")
    await registry.start_canary(MODEL, "v2", share=0.1, actor="a")
    with pytest.raises(IllegalTransition, match="already has a canary \\('v2'\\)"):
        await registry.start_canary(MODEL, "v3", share=0.1, actor="a")
    with pytest.raises(InvalidRequest, match="share"):
        await registry.start_canary(MODEL, "v3", share=1.5, actor="a")
    await registry.rollback(MODEL, "v2", actor="a")
    assert await states(registry) == {"base": "retired", "v1": "active", "v2": "rolled_back", "v3": "candidate"}
    await registry.start_canary(MODEL, "v3", share=0.5, actor="a")  # the slot is free again


async def test_unknown_models_and_versions_are_not_found(registry: StoreRegistry, tiny_lora: Path):
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        await registry.promote("nope", "v1", actor="a")
    with pytest.raises(NotFound, match="unknown model"):
        await registry.get("nope", "v1")
    assert await registry.active("nope") is None
    await register(registry, tiny_lora, "v1")
    with pytest.raises(NotFound, match="has no version 'v9'"):
        await registry.promote(MODEL, "v9", actor="a")


async def test_concurrent_promotes_serialise_and_leave_one_active(registry: StoreRegistry, tiny_lora: Path,
                                                                  store: Store):
    for v in ("v1", "v2", "v3", "v4"):
        await register(registry, tiny_lora, v)
    # the same version promoted twice at once: exactly one wins, the other is refused
    results = await asyncio.gather(*(registry.promote(MODEL, "v1", actor=f"op{i}") for i in range(2)),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["IllegalTransition", "ModelVersion"]
    # different versions at once: all apply one after the other, the last one is the only active
    await asyncio.gather(*(registry.promote(MODEL, v, actor="op") for v in ("v2", "v3", "v4")))
    views = await registry.versions(MODEL)
    assert [v.state for v in views].count("active") == 1
    # the row history alternates: at every point in time at most one version is active
    active: set[str] = set()
    for r in await model_rows(store, MODEL):
        if r["state"] == "active":
            active.add(r["version_id"])
        elif r["state"] in ("retired", "rolled_back"):
            active.discard(r["version_id"])
        assert len(active) <= 1, r
    ts = [r["ts_ms"] for r in await model_rows(store, MODEL)]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)  # strictly increasing per model


async def test_the_worker_applies_requested_actions_and_refuses_illegal_ones_visibly(
        registry: StoreRegistry, tiny_lora: Path, store: Store):
    from feedback.store import write_events

    for v in ("v1", "v2"):
        await register(registry, tiny_lora, v)
    worker = RequestWorker(registry, default_canary_share=0.3)
    reqs = [request_event(model=MODEL, version_id="v1", action="approve", actor="key-ops", tenant="ops"),
            request_event(model=MODEL, version_id="v1", action="promote", actor="canary-monitor",
                          evidence={"win_rate": 0.7}),
            request_event(model=MODEL, version_id="v2", action="rollback", actor="key-ops", reason="oops"),
            request_event(model=MODEL, version_id="v9", action="promote", actor="key-ops")]
    await write_events(store, reqs)  # as the ingester stores what the dashboard published
    assert {r.event_id for r in await unanswered_requests(store)} == {r.event_id for r in reqs}
    outcomes = await worker.run_once()
    assert [(o.action, o.applied, o.state) for o in outcomes] == [
        ("approve", True, "canary"), ("promote", True, "active"),
        ("rollback", False, REQUEST_REFUSED), ("promote", False, REQUEST_REFUSED)]
    assert "cannot rollback a version in state 'candidate'" in outcomes[2].message
    assert await unanswered_requests(store) == []
    assert await worker.run_once() == []  # handled once only
    v1 = await registry.get(MODEL, "v1")
    assert v1.state == "active" and v1.lineage["canary"]["share"] == 0.3
    assert v1.lineage["promotion"] == {"by": "canary-monitor", "ts_ms": v1.updated_ms, "reason": reqs[1].reason,
                                       "evidence": {"win_rate": 0.7}}
    refused = [r for r in await model_rows(store, MODEL, "v2") if r["state"] == REQUEST_REFUSED]
    assert len(refused) == 1 and "rollback_requested by key-ops refused" in refused[0]["reason"]
    assert json.loads(refused[0]["lineage"])["request_id"] == reqs[2].event_id
    assert (await registry.get(MODEL, "v2")).state == "candidate"  # a refusal is not a state


async def test_the_worker_loop_runs_in_the_background_and_stops_cleanly(registry: StoreRegistry, tiny_lora: Path,
                                                                        store: Store):
    from feedback.store import write_events

    await register(registry, tiny_lora, "v1")
    worker = RequestWorker(registry, poll_s=0.05)
    await worker.start()
    try:
        await write_events(store, [request_event(model=MODEL, version_id="v1", action="promote", actor="k")])
        for _ in range(200):
            if (await registry.get(MODEL, "v1")).state == "active":
                break
            await asyncio.sleep(0.05)
        assert (await registry.get(MODEL, "v1")).state == "active"
    finally:
        await worker.aclose()
    assert worker._task is None
