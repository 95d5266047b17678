"""The canary monitor: canary vs active arms on the real ClickHouse engine (chDB), and its pure decision."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import msgspec
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.monitors.canary import arm_stats, canary_versions
from feedback.monitors.canary_decision import ArmStats, decide_canary
from feedback.monitors.policy import CanaryPolicy, PolicyFile, parse_policy
from feedback.monitors.runner import Scheduler, run_cycle, store_publisher
from feedback.monitors.settings import MonitorSettings, WebhookSettings
from feedback.store import Store, write_events
from gateway.auth import KeyStore
from schemas.errors import ConfigError
from schemas.events import Event, FeedbackEvent, InferenceEvent, ModelEvent, MonitorResult
from tests.browser.dashboard_support import admin_gateway

HOUR = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: v0 becomes active
START = T0 + HOUR  # v1 enters canary
NOW = T0 + 4 * HOUR

POLICY = """
version: 1
monitors: []
canary: {min_samples: 200, min_feedback: 100, non_inferiority_margin: 0.05, rating_margin: 0.25,
         max_error_rate_increase: 0.02, max_block_rate_increase: 0.02, alpha: 0.05}
"""


def lifecycle(*, canary: bool = True) -> list[Event]:
    events: list[Event] = [
        ModelEvent(ts_ms=T0 - HOUR, model="chat", version_id="v0", base_model="tiny", state="candidate"),
        ModelEvent(ts_ms=T0, model="chat", version_id="v0", base_model="tiny", state="active",
                   previous_state="candidate")]
    if canary:
        events += [
            ModelEvent(ts_ms=START - HOUR, model="chat", version_id="v1", base_model="tiny",
                       adapter_path="/a/v1", state="candidate", artifact_sha256="abc"),
            ModelEvent(ts_ms=START, model="chat", version_id="v1", base_model="tiny", adapter_path="/a/v1",
                       state="canary", previous_state="candidate", artifact_sha256="abc", canary_share=0.2)]
    return events


def arm(rng: random.Random, *, n: int, version: str, arm: str, up_rate: float | None = None,
        ratings: Sequence[float] = (), error_rate: float = 0.0, block_rate: float = 0.0,
        start_ms: int = START, tenant: str = "acme") -> list[Event]:
    """`n` inferences of one arm over 3 h: exact shares of errors and blocks, a thumbs on each (exactly
    round(n * up_rate) up) and a rating on each drawn from `ratings` in turn."""
    errors, blocks = round(n * error_rate), round(n * block_rate)
    status = ["error"] * errors + ["blocked"] * blocks + ["ok"] * (n - errors - blocks)
    ups = [True] * round(n * (up_rate or 0)) + [False] * (n - round(n * (up_rate or 0)))
    rng.shuffle(status)
    rng.shuffle(ups)
    events: list[Event] = []
    for k in range(n):
        inf = InferenceEvent(tenant=tenant, model="chat", model_version=version, canary_arm=arm,
                             ts_ms=start_ms + k * 3 * HOUR // n, latency_ms=100 + rng.random() * 50,
                             status=status[k], output_action="block" if status[k] == "blocked" else "allow")
        events.append(inf)
        if up_rate is not None:
            events.append(FeedbackEvent(tenant=tenant, target_id=inf.event_id, kind="thumbs", thumbs=ups[k],
                                        ts_ms=inf.ts_ms + 100))
        if ratings:
            events.append(FeedbackEvent(tenant=tenant, target_id=inf.event_id, kind="rating",
                                        rating=ratings[k % len(ratings)], ts_ms=inf.ts_ms + 200))
    return events


async def seed(store: Store, *, canary: dict, active: dict, with_canary: bool = True) -> None:
    rng = random.Random(11)
    await write_events(store, [*lifecycle(canary=with_canary), *arm(rng, version="v1", arm="canary", **canary),
                               *arm(rng, version="v0", arm="active", **active)])


async def requests(store: Store) -> list[dict]:
    return (await store.query("SELECT state, actor, version_id, previous_state, reason, lineage, artifact_sha256 "
                              "FROM model_events FINAL WHERE endsWith(state, '_requested') ORDER BY ts")).to_pylist()


def policy(**canary: object) -> PolicyFile:
    p = parse_policy(POLICY)
    return p.model_copy(update={"canary": p.canary.model_copy(update=canary)})


async def cycle(store: Store, p: PolicyFile | None = None, now_ms: int = NOW, **kw: object):  # type: ignore[no-untyped-def]
    return await run_cycle(store, p or policy(), now_ms=now_ms, publish=store_publisher(store), monitors={}, **kw)


# -- on the store ------------------------------------------------------------------------------------------------------


async def test_a_clearly_better_canary_is_promoted_once_with_its_evidence(store: Store) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.85}, active={"n": 300, "up_rate": 0.70})
    first = await cycle(store)

    assert not first.errors
    [result] = first.results
    assert (result.monitor, result.metric, result.model, result.model_version) == ("canary", "canary_decision",
                                                                                   "chat", "v1")
    assert result.value == 1.0 and result.status == "ok" and result.sample_size == 300
    assert (result.window_start_ms, result.window_end_ms) == (START, NOW)
    details = json.loads(result.details)
    assert details["decision"] == "promote" and details["requested"] == "promote_requested"
    assert details["active_version"] == "v0"
    assert details["arms"]["canary"]["thumbs_up_rate"] == pytest.approx(0.85)
    assert details["arms"]["active"]["thumbs_up_rate"] == pytest.approx(0.70)
    assert details["arms"]["canary"]["requests"] == details["arms"]["active"]["requests"] == 300
    [thumbs] = [c for c in details["checks"] if c["name"] == "thumbs_up_rate"]
    assert thumbs["verdict"] == "better" and thumbs["p_not_worse"] < 1e-6

    [req] = first.model_requests
    assert (req.state, req.actor, req.version_id, req.previous_state) == ("promote_requested", "canary-monitor",
                                                                          "v1", "canary")
    assert req.artifact_sha256 == "abc" and req.adapter_path == "/a/v1"
    lineage = json.loads(req.lineage)["evidence"]
    assert lineage["monitor_event_id"] == result.event_id and lineage["decision"] == "promote"
    assert [r["state"] for r in await requests(store)] == ["promote_requested"]

    # Next cycle in this process, and after a restart (state read from nothing but the store): no second request.
    again = await cycle(store, now_ms=NOW + 60_000, state=first.state)
    restarted = await cycle(store, now_ms=NOW + 120_000)
    for report in (again, restarted):
        assert report.model_requests == []
        [r] = report.results
        assert json.loads(r.details)["request_skipped"] == "promote already requested for this canary"
    assert len(await requests(store)) == 1


async def test_the_scheduler_requests_once_while_the_request_is_still_on_its_way_and_posts_one_alert(
        store: Store, tmp_path: Path) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.85}, active={"n": 300, "up_rate": 0.70})
    (tmp_path / "monitors.yaml").write_text(POLICY)
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    published: list[Event] = []

    async def in_flight(events: Sequence[Event]) -> None:  # accepted by the sink; the store never sees them here
        published.extend(events)

    settings = MonitorSettings(policy_path=tmp_path / "monitors.yaml", interval_s=0.1,
                               webhook=WebhookSettings(url=f"http://127.0.0.1:{port}/hook"))
    clock = iter(range(NOW, NOW + 10**9, 1000))
    scheduler = Scheduler(store, settings, in_flight, clock=lambda: next(clock), monitors={})
    await scheduler.start()
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while scheduler.cycles < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await scheduler.aclose()
        await runner.cleanup()
    assert scheduler.cycles >= 3 and scheduler.last_error is None
    assert [e.state for e in published if isinstance(e, ModelEvent)] == ["promote_requested"]
    assert len([e for e in published if isinstance(e, MonitorResult)]) == scheduler.cycles  # one decision a cycle
    assert [(a["event"], a["monitor"], a["action"], a["model_version"]) for a in received] == [
        ("fired", "canary", "promote", "v1")]
    assert "thumbs_up_rate" in received[0]["reason"]


async def test_clearly_worse_ratings_request_a_rollback(store: Store) -> None:
    await seed(store, canary={"n": 300, "ratings": (2, 3, 4)}, active={"n": 300, "ratings": (3, 4, 5)})
    report = await cycle(store)

    [result] = report.results
    assert result.status == "alert" and result.value == -1.0
    [req] = report.model_requests
    assert req.state == "rollback_requested" and req.actor == "canary-monitor"
    assert "mean_rating" in req.reason
    [rating] = [c for c in json.loads(req.lineage)["evidence"]["checks"] if c["name"] == "mean_rating"]
    assert rating["verdict"] == "worse" and rating["canary"] == pytest.approx(3.0)
    assert rating["active"] == pytest.approx(4.0)
    assert [r["state"] for r in await requests(store)] == ["rollback_requested"]


async def test_an_error_spike_rolls_back_even_with_good_ratings(store: Store) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.9, "error_rate": 0.10},
               active={"n": 300, "up_rate": 0.7, "error_rate": 0.01})
    report = await cycle(store)

    [req] = report.model_requests
    assert req.state == "rollback_requested"
    assert req.reason.startswith("canary monitor: rollback: error_rate 0.1 vs active 0.01")
    details = json.loads(report.results[0].details)
    assert details["arms"]["canary"]["error_rate"] == pytest.approx(0.10)


async def test_a_guardrail_block_spike_rolls_back(store: Store) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.8, "block_rate": 0.12},
               active={"n": 300, "up_rate": 0.8, "block_rate": 0.02})
    report = await cycle(store)
    [req] = report.model_requests
    assert req.state == "rollback_requested" and "block_rate" in req.reason


async def test_too_few_samples_wait_and_request_nothing(store: Store) -> None:
    await seed(store, canary={"n": 60, "up_rate": 0.2}, active={"n": 300, "up_rate": 0.9})
    report = await cycle(store)

    [result] = report.results
    assert result.status == "insufficient_data" and result.value == 0.0 and result.sample_size == 60
    assert json.loads(result.details)["decision"] == "wait"
    assert report.model_requests == [] and await requests(store) == []


async def test_with_auto_promote_off_only_the_recommendation_is_recorded(store: Store) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.85}, active={"n": 300, "up_rate": 0.70})
    report = await cycle(store, policy(auto_promote=False))

    [result] = report.results
    details = json.loads(result.details)
    assert details["decision"] == "promote" and details["requested"] is None
    assert details["request_skipped"] == "auto_promote is off: recommendation only"
    assert report.model_requests == [] and await requests(store) == []


async def test_without_a_canary_the_monitor_does_nothing(store: Store) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.85}, active={"n": 300, "up_rate": 0.70}, with_canary=False)
    report = await cycle(store)
    assert report.results == [] and report.model_requests == [] and not report.errors


async def test_a_disabled_canary_monitor_reads_nothing(store: Store) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.85}, active={"n": 300, "up_rate": 0.70})
    report = await cycle(store, policy(enabled=False))
    assert report.results == [] and report.model_requests == []


async def test_a_rollback_request_blocks_a_later_promotion_and_a_decided_canary_is_left_alone(store: Store) -> None:
    await seed(store, canary={"n": 300, "up_rate": 0.85}, active={"n": 300, "up_rate": 0.70})
    await write_events(store, [ModelEvent(ts_ms=NOW - HOUR, model="chat", version_id="v1", state="rollback_requested",
                                          previous_state="canary", actor="key-ops"),
                               # the registry's answer to a request it could not apply is no lifecycle state
                               ModelEvent(ts_ms=NOW - HOUR + 1, model="chat", version_id="v1",
                                          state="request_refused", previous_state="canary", actor="registry")])
    report = await cycle(store)
    assert [r.model_version for r in report.results] == ["v1"]  # still a canary
    assert report.model_requests == []
    assert json.loads(report.results[0].details)["request_skipped"] == "rollback already requested for this canary"

    # The registry promoted it: it is no canary any more.
    await write_events(store, [ModelEvent(ts_ms=NOW, model="chat", version_id="v1", state="active",
                                          previous_state="canary", actor="registry")])
    assert await canary_versions(store, now_ms=NOW + 1) == []
    assert (await cycle(store, now_ms=NOW + 1)).results == []


async def test_arms_count_preferences_between_them_and_keep_other_tenants_feedback_out(store: Store) -> None:
    await write_events(store, lifecycle())
    c = InferenceEvent(tenant="acme", model="chat", model_version="v1", canary_arm="canary", ts_ms=START + 10,
                       latency_ms=90, output_action="redact")
    a = InferenceEvent(tenant="acme", model="chat", model_version="v0", canary_arm="active", ts_ms=START + 20,
                       latency_ms=200)
    before = InferenceEvent(tenant="acme", model="chat", model_version="v0", ts_ms=START - 10)  # before the canary
    other = InferenceEvent(tenant="acme", model="other", model_version="v0", canary_arm="active", ts_ms=START + 30)
    await write_events(store, [c, a, before, other,
                               FeedbackEvent(tenant="acme", target_id=c.event_id, kind="preference",
                                             preferred_id=c.event_id, other_id=a.event_id, ts_ms=START + 100),
                               FeedbackEvent(tenant="acme", target_id=c.event_id, kind="thumbs", thumbs=True,
                                             ts_ms=START + 100),
                               FeedbackEvent(tenant="evil", target_id=a.event_id, kind="thumbs", thumbs=True,
                                             ts_ms=START + 100)])
    [version] = await canary_versions(store, now_ms=NOW)
    assert (version.version_id, version.active_version, version.since_ms, version.canary_share) == ("v1", "v0",
                                                                                                    START, 0.2)
    canary, active = await arm_stats(store, version, now_ms=NOW)
    assert (canary.requests, canary.redacted, canary.thumbs_up, canary.wins, canary.comparisons) == (1, 1, 1, 1, 1)
    assert (active.requests, active.thumbs_n, active.wins, active.comparisons) == (1, 0, 0, 1)
    assert canary.latency_p95_ms == 90 and active.latency_p95_ms == 200


# -- the decision (pure) -----------------------------------------------------------------------------------------------

P = CanaryPolicy(min_samples=200, min_feedback=100, non_inferiority_margin=0.05, rating_margin=0.25,
                 max_error_rate_increase=0.02, max_block_rate_increase=0.02, alpha=0.05)


def arms(*, n: int = 1000, up: tuple[float, float] | None = (0.8, 0.8), err: tuple[int, int] = (0, 0),
         blocked: tuple[int, int] = (0, 0), rated: int | None = None) -> tuple[ArmStats, ArmStats]:
    k = n if rated is None else rated
    return tuple(ArmStats(requests=n, errors=err[i], blocked=blocked[i], thumbs_n=k if up else 0,
                          thumbs_up=round(k * up[i]) if up else 0) for i in (0, 1))  # type: ignore[return-value]


def test_samples_one_short_of_the_minimum_wait_and_at_the_minimum_decide() -> None:
    c, a = arms(n=199)
    assert decide_canary(c, a, P).action == "wait" and not decide_canary(c, a, P).enough_samples
    c, a = arms(n=200, up=(0.9, 0.7))
    assert decide_canary(c, a, P).action == "promote"


def test_equal_arms_with_enough_feedback_are_promoted_as_not_worse() -> None:
    d = decide_canary(*arms(n=2000), P)
    assert d.action == "promote"
    [thumbs] = [c for c in d.checks if c.name == "thumbs_up_rate"]
    assert thumbs.verdict == "not_worse" and thumbs.p_not_worse is not None and thumbs.p_not_worse < 0.05


def test_slightly_worse_within_the_margin_is_promoted_but_beyond_it_is_rolled_back() -> None:
    assert decide_canary(*arms(n=5000, up=(0.78, 0.80)), P).action == "promote"
    d = decide_canary(*arms(n=5000, up=(0.70, 0.80)), P)
    assert d.action == "rollback" and "thumbs_up_rate" in d.reasons[0]


def test_worse_beyond_the_margin_but_not_significant_waits_with_a_warning() -> None:
    d = decide_canary(*arms(n=300, rated=120, up=(0.70, 0.77)), P)
    assert d.action == "wait" and d.pending_bad


def test_an_error_increase_exactly_at_the_margin_does_not_roll_back() -> None:
    assert decide_canary(*arms(n=1000, err=(20, 0)), P).action == "promote"  # +0.02, not more
    assert decide_canary(*arms(n=1000, err=(50, 0)), P).action == "rollback"
    assert decide_canary(*arms(n=1000, blocked=(50, 5)), P).action == "rollback"


def test_without_feedback_there_is_no_promotion_but_a_spike_still_rolls_back() -> None:
    c, a = arms(up=None)
    d = decide_canary(c, a, P)
    assert d.action == "wait" and "too little feedback" in d.reasons[0]
    c, a = arms(up=None, err=(100, 10))
    assert decide_canary(c, a, P).action == "rollback"


def test_ratings_and_preferences_count_as_signals() -> None:
    base = {"requests": 500, "rating_n": 400, "rating_var": 0.8}
    c = ArmStats(**base, rating_mean=4.1, wins=70, comparisons=120)
    a = ArmStats(**base, rating_mean=4.0, wins=50, comparisons=120)
    d = decide_canary(c, a, P)
    assert d.action == "promote" and {x.name for x in d.checks} == {"error_rate", "block_rate", "mean_rating",
                                                                      "win_rate"}
    lost = ArmStats(**base, rating_mean=4.1, wins=30, comparisons=120)
    assert decide_canary(lost, a, P).action == "rollback"
    same = {"requests": 500, "rating_n": 400, "rating_var": 0.0, "rating_mean": 5.0}
    assert decide_canary(ArmStats(**same), ArmStats(**same), P).action == "promote"  # identical ratings: exact


@settings(max_examples=150, deadline=None)
@given(n=st.integers(min_value=1, max_value=3000), data=st.data())
def test_identical_arms_never_roll_back_and_a_better_canary_never_does_worse(n: int, data: st.DataObject) -> None:
    up = data.draw(st.integers(min_value=0, max_value=n))
    err = data.draw(st.integers(min_value=0, max_value=n))
    same = ArmStats(requests=n, errors=err, thumbs_n=n, thumbs_up=up)
    assert decide_canary(same, same, P).action != "rollback"
    # more thumbs up and fewer errors for the canary: a decision can only move toward promote
    worse = ArmStats(requests=n, errors=err, thumbs_n=n, thumbs_up=data.draw(st.integers(min_value=0, max_value=up)))
    better = ArmStats(requests=n, errors=data.draw(st.integers(min_value=0, max_value=err)), thumbs_n=n, thumbs_up=up)
    rank = {"rollback": 0, "wait": 1, "promote": 2}
    assert rank[decide_canary(better, same, P).action] >= rank[decide_canary(worse, same, P).action]


def test_a_policy_without_a_canary_section_gets_the_defaults_and_bad_values_are_named() -> None:
    assert parse_policy("version: 1\nmonitors: []\n").canary == CanaryPolicy()
    with pytest.raises(ConfigError, match=r"canary\.alpha"):
        parse_policy("canary: {alpha: 1.5}")
    with pytest.raises(ConfigError, match=r"canary\.auto_promte: Extra inputs are not permitted"):
        parse_policy("canary: {auto_promte: false}")


# -- the admin API ------------------------------------------------------------------------------------------------------


async def test_the_admin_api_shows_both_arms_side_by_side_with_the_latest_decision(store: Store,
                                                                                   keystore: KeyStore) -> None:
    now = time.time_ns() // 1_000_000
    rng = random.Random(5)
    start = now - 4 * HOUR
    await write_events(store, [
        ModelEvent(ts_ms=start - HOUR, model="chat", version_id="v0", state="active"),
        ModelEvent(ts_ms=start, model="chat", version_id="v1", state="canary", previous_state="candidate",
                   canary_share=0.25),
        *arm(rng, n=40, version="v1", arm="canary", up_rate=0.75, error_rate=0.05, start_ms=start),
        *arm(rng, n=60, version="v0", arm="active", up_rate=0.5, start_ms=start)])
    await cycle(store, now_ms=now - 1000)  # too few samples: wait

    async with admin_gateway(store, keystore, report_dir=None) as gw:
        _, key = gw.key()
        async with httpx.AsyncClient(base_url=gw.http, headers={"Authorization": f"Bearer {key}"}) as c:
            body = (await c.get("/admin/v1/canary")).json()
            assert (await c.get("/admin/v1/canary", params={"model": "other"})).json()["canaries"] == []
            bad = await c.get("/admin/v1/canary", params={"modle": "chat"})
        _, infer_key = gw.key("acme", ("infer",))
        async with httpx.AsyncClient(base_url=gw.http) as c:
            refused = await c.get("/admin/v1/canary", headers={"Authorization": f"Bearer {infer_key}"})
    [v1] = body["canaries"]
    assert (v1["model"], v1["version_id"], v1["active_version"], v1["since_ms"], v1["canary_share"]) == (
        "chat", "v1", "v0", start, 0.25)
    canary, active = v1["arms"]["canary"], v1["arms"]["active"]
    assert (canary["requests"], canary["errors"], canary["thumbs_up_rate"]) == (40, 2, 0.75)
    assert (active["requests"], active["errors"], active["thumbs_up_rate"]) == (60, 0, 0.5)
    assert v1["decision"]["action"] == "wait" and v1["decision"]["status"] == "insufficient_data"
    assert "too few requests" in v1["decision"]["reasons"][0]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "modle"
    assert refused.status_code == 403


# -- with the real registry ---------------------------------------------------------------------------------------------


async def test_the_registry_acts_on_the_monitors_request_and_the_canary_is_then_left_alone(store: Store,
                                                                                          tmp_path: Path) -> None:
    from retrain.registry import StoreRegistry
    from retrain.requests import RequestWorker

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    clock = [START - 60_000]
    registry = StoreRegistry(store, tmp_path / "artifacts", clock=lambda: clock[0])
    await registry.register_candidate(model="chat", base_model="tiny", adapter_dir=adapter, lineage={},
                                      actor="test", version_id="v1")
    clock[0] = START
    await registry.start_canary("chat", "v1", share=0.2, actor="test")
    rng = random.Random(3)
    # no adapter was active before: the active arm is the registry's implicit `base` version
    await write_events(store, [*arm(rng, n=300, version="v1", arm="canary", ratings=(4, 5, 5)),
                               *arm(rng, n=300, version="base", arm="active", ratings=(3, 4, 5))])

    report = await cycle(store)
    [req] = report.model_requests
    assert req.state == "promote_requested" and json.loads(report.results[0].details)["active_version"] == "base"

    clock[0] = NOW + 1000
    [outcome] = await RequestWorker(registry).run_once()
    assert (outcome.applied, outcome.state, outcome.request_id) == (True, "active", req.event_id)
    v1 = await registry.get("chat", "v1")
    assert v1.state == "active" and v1.actor == "canary-monitor"
    assert "mean_rating" in json.dumps(v1.lineage)  # the monitor's evidence travels into the version's lineage

    after = await cycle(store, now_ms=NOW + 2000)
    assert after.results == [] and after.model_requests == []


async def test_shadow_replays_of_the_canary_version_are_not_canary_traffic(store: Store) -> None:
    """Shadow answers (gateway/shadow.py) carry the canary's version but served nobody: failing ones change nothing."""
    await seed(store, canary={"n": 300, "up_rate": 0.9}, active={"n": 300, "up_rate": 0.7, "error_rate": 0.01})
    shadows = [msgspec.structs.replace(e, shadow=True, shadow_of="served-id", canary_arm="shadow")
               for e in arm(random.Random(5), n=300, version="v1", arm="shadow", error_rate=0.5)]
    await write_events(store, shadows)
    report = await cycle(store)
    details = json.loads(report.results[0].details)
    assert details["arms"]["canary"]["error_rate"] == 0.0
    assert all(r.state != "rollback_requested" for r in report.model_requests)
