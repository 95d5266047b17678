"""Acceptance 1: tenants are isolated. Marker phrases planted in tenant bolt's feedback (its prompts, answers and
corrections) never reach tenant acme: not acme's training dataset, not the lineage of acme's or the global
adapter as acme reads it, not any admin API answer to acme's key; acme's key cannot read, promote or roll back
bolt's versions. The checks are shown to be able to fail: bolt's own dataset and an operator's reads do hold
the markers. Real chDB, real registry, a real gateway with the registry's admin routes (remote engine stub).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback.dashboard.models_api import models_extension
from feedback.store import Store, write_events
from gateway.auth import KeyStore
from gateway.engines.remote import RemoteEngine
from gateway.server import Gateway, GatewayServer
from gateway.settings import GatewaySettings, ModelSettings, RateLimitSettings
from retrain.datasets import build_snapshot
from retrain.registry import StoreRegistry
from retrain.settings import RetrainSettings
from retrain.tiny.preferences import style_preference_events
from retrain.worker import RetrainWorker, outcomes
from schemas.events import Event, FeedbackEvent, InferenceEvent, Message, RetrainTrigger
from tests.support.openai_upstream import RunningUpstream
from tests.tenancy.conftest import DAY, MODEL, T0

MARKERS = ("PURPLE-OTTER-7731", "zanzibar ledger quokka")


def _planted(tenant: str) -> list[Event]:
    """Thumbs, ratings and corrections on answers carrying the markers, for `tenant`."""
    out: list[Event] = []
    for i in range(12):
        good = InferenceEvent(tenant=tenant, ts_ms=T0 + 10_000 + i, model=MODEL, model_version="base",
                              messages=(Message("user", f"Tell me about {MARKERS[1]} number {i}"),),
                              response=f"Sure! {MARKERS[0]} is fine ({i}).")
        bad = InferenceEvent(tenant=tenant, ts_ms=T0 + 10_000 + i, model=MODEL, model_version="base",
                             messages=(Message("user", f"Tell me about {MARKERS[1]} number {i}"),),
                             response=f"No. {MARKERS[0]} never ({i}).")
        out += [good, bad,
                FeedbackEvent(tenant=tenant, ts_ms=T0 + 20_000 + i, target_id=good.event_id, kind="preference",
                              preferred_id=good.event_id, other_id=bad.event_id, user=f"u{i}"),
                FeedbackEvent(tenant=tenant, ts_ms=T0 + 20_100 + i, target_id=bad.event_id, kind="correction",
                              correction=f"Better: {MARKERS[0]} with {MARKERS[1]}.", user=f"u{i}")]
    return out


def _text_of(snapshot_dir: Path) -> str:
    import pyarrow.parquet as pq

    parts = [p.read_text() for p in snapshot_dir.glob("*.json")]
    parts += [json.dumps(pq.read_table(p).to_pylist(), default=str) for p in snapshot_dir.glob("*.parquet")]
    return "\n".join(parts)


async def _cli(url: str, key: str, *args: str) -> tuple[int, str, str]:
    """`servoloop models …` as its own process against the admin API."""
    env = {**os.environ, "SERVOLOOP_URL": url, "SERVOLOOP_ADMIN_KEY": key, "COLUMNS": "200"}
    env.pop("SERVOLOOP_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from servoloop.cli import main; main()", "models", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), " ".join(err.decode().split())


def _has_marker(text: str) -> bool:
    return any(m in text for m in MARKERS)


@pytest.fixture
async def admin_api(store: Store, keystore: KeyStore) -> AsyncIterator[str]:
    upstream = await RunningUpstream().start()
    models = [ModelSettings(name=MODEL, engine="remote", url=upstream.url)]
    engines = {m.name: RemoteEngine(m) for m in models}
    for e in engines.values():
        await e.start()
    gw = Gateway(GatewaySettings(models=models, rate_limits=RateLimitSettings(
        requests_per_minute=0, tokens_per_minute=0, max_concurrent_streams=0)), keystore, engines=engines)
    gw.http_extensions.append(models_extension(store, gw.auth.authenticate,
                                               publish=lambda e: None, operator_tenants=("ops",)))
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.http_port}"
    finally:
        await server.stop()
        for e in engines.values():
            await e.aclose()
        await upstream.stop()


async def test_marker_phrases_of_one_tenant_never_reach_another_and_its_key_cannot_touch_its_versions(
        store: Store, keystore: KeyStore, admin_api: str, tmp_path: Path) -> None:
    acme_inf, acme_fb = style_preference_events(60, tenant="acme", model=MODEL, start_ms=T0, seed=5)
    bolt_inf, bolt_fb = style_preference_events(60, tenant="bolt", model=MODEL, start_ms=T0, seed=6, reverse=True)
    bolt_planted = _planted("bolt")
    await write_events(store, [*acme_inf, *acme_fb, *bolt_inf, *bolt_fb, *bolt_planted])

    def trigger(tenant: str) -> RetrainTrigger:
        return RetrainTrigger(tenant=tenant, model=MODEL, method="dpo", window_start_ms=T0, window_end_ms=T0 + DAY)

    settings = RetrainSettings(work_dir=tmp_path / "work", use_embeddings=False, min_pairs=1, tenant_min_feedback=10,
                               private_tenants=["bolt"])
    registry = StoreRegistry(store, tmp_path / "artifacts")
    worker = RetrainWorker(store, registry, settings)

    # datasets: acme's has none of bolt's markers; bolt's has them (the check can fail); a global one skips bolt,
    # a private tenant, and holds them once bolt's policy lets its feedback count globally
    snaps = tmp_path / "snapshots"
    acme = await build_snapshot(store, worker.filters_for(trigger("acme")), snaps)
    bolt = await build_snapshot(store, worker.filters_for(trigger("bolt")), snaps)
    global_private = await build_snapshot(store, worker.filters_for(trigger("")), snaps)
    pooled = RetrainWorker(store, registry, settings.model_copy(update={"private_tenants": []}))
    global_pooled = await build_snapshot(store, pooled.filters_for(trigger("")), snaps)
    assert acme.manifest["counts"]["train"] > 0 and not _has_marker(_text_of(acme.path))
    assert _has_marker(_text_of(bolt.path))
    assert not _has_marker(_text_of(global_private.path))
    assert _has_marker(_text_of(global_pooled.path))
    acme_ids = {i.event_id for i in acme_fb}
    assert set(acme.manifest["feedback_ids"]) <= acme_ids

    # versions: acme's, bolt's, and a global one trained on everyone's feedback (bolt's included)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")

    def lineage(snapshot: object, tenant: str) -> dict[str, object]:
        m = snapshot.manifest  # type: ignore[attr-defined]
        return {"dataset": {"tenant": tenant, "window_start_ms": T0, "window_end_ms": T0 + DAY,
                            "feedback_ids": m["feedback_ids"], "sha256": m["sha256"]}, "parent_version": "base"}

    for vid, tenant, snap in (("a1", "acme", acme), ("b1", "bolt", bolt), ("g1", "", global_pooled)):
        await registry.register_candidate(model=MODEL, base_model="tiny", adapter_dir=adapter,
                                          lineage=lineage(snap, tenant), actor="retrain-worker", version_id=vid,
                                          tenant=tenant)
    await registry.promote(MODEL, "g1", actor="ops")
    await registry.promote(MODEL, "b1", actor="ops")

    _, acme_key = keystore.create("acme", ["admin"])
    _, ops_key = keystore.create("ops", ["admin"])
    async with httpx.AsyncClient(base_url=admin_api, timeout=30) as http:
        await http.get("/healthz")
        acme_h, ops_h = {"Authorization": f"Bearer {acme_key}"}, {"Authorization": f"Bearer {ops_key}"}
        for _ in range(50):  # the gateway reloads keys on its own schedule: wait until acme's key is known
            if (await http.get(f"/admin/v1/models/{MODEL}/versions", headers=acme_h)).status_code != 401:
                break
            await asyncio.sleep(0.1)
        answers: list[httpx.Response] = []

        async def as_acme(method: str, path: str, **kw: object) -> httpx.Response:
            r = await http.request(method, path, headers=acme_h, **kw)  # type: ignore[arg-type]
            answers.append(r)
            return r

        listing = await as_acme("GET", f"/admin/v1/models/{MODEL}/versions")
        assert listing.status_code == 200, listing.text
        body = listing.json()
        assert {v["version_id"] for v in body["versions"]} == {"base", "a1", "g1"}
        assert body["tenant"] == "acme" and body["active"] == "g1"  # acme has no active version of its own yet
        assert (await as_acme("GET", f"/admin/v1/models/{MODEL}/versions", params={"tenant": "bolt"})).status_code == 403
        assert (await as_acme("GET", f"/admin/v1/models/{MODEL}/versions/b1")).status_code == 403
        for action in ("promote", "rollback", "reject", "canary"):
            r = await as_acme("POST", f"/admin/v1/models/{MODEL}/requests", json={"version": "b1", "action": action})
            assert r.status_code == 403 and r.json()["error"]["code"] == "other_tenant", r.text
        r = await as_acme("POST", f"/admin/v1/models/{MODEL}/requests", json={"version": "g1", "action": "rollback"})
        assert r.status_code == 403 and "global" in r.json()["error"]["message"]
        planted_inference = next(e for e in bolt_planted if isinstance(e, InferenceEvent))
        assert (await as_acme("GET", f"/admin/v1/lineage/{planted_inference.event_id}")).status_code == 404
        own = await as_acme("GET", f"/admin/v1/models/{MODEL}/versions/a1")
        assert own.status_code == 200 and own.json()["lineage"]["tenant"] == "acme"
        assert own.json()["feedback"]["count"] > 0
        shared = await as_acme("GET", f"/admin/v1/models/{MODEL}/versions/g1")
        assert shared.status_code == 200 and {f["tenant"] for f in shared.json()["feedback"]["rows"]} == {"acme"}
        accepted = await as_acme("POST", f"/admin/v1/models/{MODEL}/requests", json={"version": "a1",
                                                                                    "action": "promote"})
        assert accepted.status_code == 202, accepted.text
        for r in answers:
            assert not _has_marker(r.text), (r.request.url, r.text[:300])
            assert "b1" not in {v.get("version_id") for v in (r.json().get("versions") or [])}

        # an operator's key does see bolt's version and the markers in the global lineage: the checks above bite
        r = await http.get(f"/admin/v1/models/{MODEL}/versions", headers=ops_h, params={"tenant": "bolt"})
        assert r.status_code == 200 and r.json()["active"] == "b1"
        assert _has_marker((await http.get(f"/admin/v1/models/{MODEL}/versions/g1", headers=ops_h)).text)

    # the CLI: `servoloop models list --tenant T` shows T's versions and the global ones; acme's key may not ask
    rc, out, _ = await _cli(admin_api, ops_key, "list", MODEL, "--tenant", "bolt", "--json")
    assert rc == 0 and {v["version_id"]: v["tenant"] for v in json.loads(out)[0]["versions"]} == {
        "base": "", "g1": "", "b1": "bolt"}
    rc, out, err = await _cli(admin_api, acme_key, "list", MODEL, "--tenant", "bolt")
    assert rc != 0 and "only its own tenant" in err and "b1" not in out

    # a tenant below the minimum feedback gets no adapter of its own: declined, with the reason recorded
    strict = RetrainWorker(store, registry, settings.model_copy(update={"tenant_min_feedback": 10_000}))
    declined = await strict.handle(trigger("acme"))
    assert declined.outcome == "declined" and "tenant_min_feedback 10000" in declined.reasons[0]
    assert "counts toward the global model" in declined.reasons[0]
    assert (await strict.handle(trigger("bolt"))).reasons[0].endswith("keeps its feedback out of the global model)")
    recorded = await outcomes(store)
    assert {o["outcome"] for o in recorded} == {"declined"} and len(recorded) == 2
