"""Monitor cycles on the real ClickHouse engine (chDB): what fires, what does not, and what fires only once."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiohttp import web

from feedback.monitors.base import GroupKey, MonitorWindow
from feedback.monitors.policy import MonitorPolicy, parse_policy
from feedback.monitors.quality import Price, quality_snapshot
from feedback.monitors.runner import Scheduler, run_cycle, sink_publisher, store_publisher
from feedback.monitors.settings import MonitorSettings, WebhookSettings
from feedback.pipeline import EventPipeline
from feedback.settings import BrokerSettings, EventSettings, IngestSettings
from feedback.store import Store, count_rows, write_events
from schemas.events import Event, FeedbackEvent, InferenceEvent, MonitorResult, RetrainTrigger

HOUR = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z; the baseline window
NOW = T0 + 25 * HOUR  # current window = the last hour, baseline = the 24 h before it

POLICY = """
version: 1
defaults: {window: {current: 1h, baseline: 24h}, min_samples: 100, alpha: 0.05, cooldown: 6h}
monitors:
  - name: satisfaction_drop
    metric: thumbs_up_rate
    threshold: 0.05
    clear: 0.02
    action: {type: retrain, recipe: dpo, data_window: 7d}
"""


def rated(rng: random.Random, *, n: int, up_rate: float, start_ms: int, span_ms: int, version: str,
          tenant: str = "acme", model: str = "chat") -> list[Event]:
    """`n` inferences spread over the span, each with one thumbs rating: exactly round(n * up_rate) up."""
    ups = round(n * up_rate)
    verdicts = [True] * ups + [False] * (n - ups)
    rng.shuffle(verdicts)
    events: list[Event] = []
    for k, up in enumerate(verdicts):
        inf = InferenceEvent(tenant=tenant, model=model, model_version=version, ts_ms=start_ms + k * span_ms // n,
                             latency_ms=100 + rng.random() * 20, tokens_in=20, tokens_out=40)
        events += [inf, FeedbackEvent(tenant=tenant, target_id=inf.event_id, kind="thumbs", thumbs=up,
                                      ts_ms=inf.ts_ms + 500)]
    return events


async def seed(store: Store, *, current_v1: tuple[int, float], baseline_n: int = 600) -> None:
    """Baseline: v1 and v2 at 80 % thumbs up. Current hour: v2 unchanged, v1 as given (n, rate)."""
    rng = random.Random(7)
    events = []
    for version in ("v1", "v2"):
        events += rated(rng, n=baseline_n, up_rate=0.8, start_ms=T0, span_ms=24 * HOUR, version=version)
    events += rated(rng, n=300, up_rate=0.8, start_ms=NOW - HOUR, span_ms=HOUR, version="v2")
    n, rate = current_v1
    events += rated(rng, n=n, up_rate=rate, start_ms=NOW - HOUR, span_ms=HOUR, version="v1")
    await write_events(store, events)


def satisfaction(results: list[MonitorResult], version: str) -> MonitorResult:
    [r] = [r for r in results if r.monitor == "satisfaction_drop" and r.model_version == version]
    return r


async def test_a_significant_satisfaction_drop_of_one_version_emits_exactly_one_trigger_with_its_evidence(
        store: Store) -> None:
    await seed(store, current_v1=(300, 0.6))
    report = await run_cycle(store, parse_policy(POLICY), now_ms=NOW, publish=store_publisher(store))

    assert not report.errors
    [trigger] = report.triggers
    assert (trigger.tenant, trigger.model, trigger.model_version, trigger.method) == ("acme", "chat", "v1", "dpo")
    assert (trigger.window_start_ms, trigger.window_end_ms) == (NOW - 7 * 24 * HOUR, NOW)
    evidence = json.loads(trigger.params)
    assert evidence["metric"] == "thumbs_up_rate" and evidence["monitor"] == "satisfaction_drop"
    assert evidence["baseline"] == pytest.approx(0.8) and evidence["current"] == pytest.approx(0.6)
    assert evidence["sample_size"] == 300 and evidence["baseline_sample_size"] == 600
    assert evidence["p_value"] < 1e-6
    assert evidence["window"] == [NOW - HOUR, NOW] and evidence["baseline_window"] == [NOW - 25 * HOUR, NOW - HOUR]

    v1, v2 = satisfaction(report.results, "v1"), satisfaction(report.results, "v2")
    assert trigger.monitor_event_id == v1.event_id
    assert (v1.status, v2.status) == ("alert", "ok")
    assert v1.value == pytest.approx(0.6) and v1.sample_size == 300
    assert json.loads(v1.details)["ci_low"] < 0.6 < json.loads(v1.details)["ci_high"]
    assert len(report.results) == 2  # one result per monitor and group

    # Both went through `publish` (here: the store).
    assert await count_rows(store, "retrain_triggers") == 1
    assert await count_rows(store, "monitor_results") == 2


@pytest.mark.parametrize(("current_v1", "status"), [
    ((30, 0.4), "insufficient_data"),  # a big drop, but 30 ratings are under min_samples
    ((300, 0.79), "ok"),               # noise: one point down
    ((100, 0.74), "warn"),             # past the 5-point threshold, but p ~ 0.1: not significant
], ids=["tiny-sample", "noise-level-change", "large-but-not-significant"])
async def test_a_tiny_sample_or_a_noise_level_change_triggers_nothing(store: Store, current_v1: tuple[int, float],
                                                                     status: str) -> None:
    await seed(store, current_v1=current_v1)
    report = await run_cycle(store, parse_policy(POLICY), now_ms=NOW, publish=store_publisher(store))

    assert report.triggers == [] and report.alerts == []
    v1 = satisfaction(report.results, "v1")
    assert v1.status == status
    assert await count_rows(store, "retrain_triggers") == 0


async def test_running_the_cycle_again_does_not_fire_twice_even_after_a_restart(store: Store) -> None:
    await seed(store, current_v1=(300, 0.6))
    policy = parse_policy(POLICY)
    first = await run_cycle(store, policy, now_ms=NOW, publish=store_publisher(store))
    assert len(first.triggers) == 1

    # In-process: the state handed on.
    again = await run_cycle(store, policy, now_ms=NOW + 60_000, publish=store_publisher(store), state=first.state)
    # A restart: no state in memory, read back from the store.
    restarted = await run_cycle(store, policy, now_ms=NOW + 120_000, publish=store_publisher(store))

    for report in (again, restarted):
        assert report.triggers == [] and report.alerts == []
        assert satisfaction(report.results, "v1").status == "alert"  # the incident is still open
    assert await count_rows(store, "retrain_triggers") == 1


async def test_a_recovered_version_resolves_and_a_new_drop_inside_the_cooldown_stays_quiet(store: Store) -> None:
    await seed(store, current_v1=(300, 0.6))
    policy = parse_policy(POLICY)
    fired = await run_cycle(store, policy, now_ms=NOW, publish=store_publisher(store))
    assert len(fired.triggers) == 1

    # The next hour v1 is back at 80 %: resolved (below the clear level).
    rng = random.Random(3)
    await write_events(store, rated(rng, n=300, up_rate=0.8, start_ms=NOW, span_ms=HOUR, version="v1"))
    resolved = await run_cycle(store, policy, now_ms=NOW + HOUR, publish=store_publisher(store))
    assert satisfaction(resolved.results, "v1").status == "ok"
    assert [a.event for a in resolved.alerts] == ["resolved"]

    # And the hour after, it drops again, 2 h after the fire: inside the 6 h cooldown, nothing fires.
    await write_events(store, rated(rng, n=300, up_rate=0.6, start_ms=NOW + HOUR, span_ms=HOUR, version="v1"))
    quiet = await run_cycle(store, policy, now_ms=NOW + 2 * HOUR, publish=store_publisher(store))
    v1 = satisfaction(quiet.results, "v1")
    assert v1.status == "alert" and json.loads(v1.details)["suppressed"] == "cooldown"
    assert quiet.triggers == [] and quiet.alerts == []


async def test_every_quality_metric_comes_with_sample_size_and_interval_per_group(store: Store) -> None:
    a = InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=NOW - 1000, latency_ms=120,
                       ttft_ms=15, tokens_in=10, tokens_out=30, output_action="redact")
    b = InferenceEvent(tenant="acme", model="chat", model_version="v2", canary_arm="canary", ts_ms=NOW - 900,
                       latency_ms=80, ttft_ms=10, tokens_in=10, tokens_out=10)
    c = InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=NOW - 800, status="error")
    d = InferenceEvent(tenant="other", model="chat", model_version="v1", ts_ms=NOW - 700, status="blocked",
                       input_action="block")
    await write_events(store, [a, b, c, d,
                               FeedbackEvent(tenant="acme", target_id=a.event_id, kind="rating", rating=4, ts_ms=NOW - 500),
                               FeedbackEvent(tenant="acme", target_id=a.event_id, kind="correction",
                                             correction="better", ts_ms=NOW - 400),
                               # a second thumbs on the same inference: the latest counts
                               FeedbackEvent(tenant="acme", target_id=a.event_id, kind="thumbs", thumbs=False,
                                             ts_ms=NOW - 450),
                               FeedbackEvent(tenant="acme", target_id=a.event_id, kind="thumbs", thumbs=True,
                                             ts_ms=NOW - 300),
                               # another tenant cannot rate acme's inference
                               FeedbackEvent(tenant="other", target_id=b.event_id, kind="thumbs", thumbs=False,
                                             ts_ms=NOW - 300),
                               FeedbackEvent(tenant="acme", target_id=b.event_id, kind="preference",
                                             preferred_id=b.event_id, other_id=a.event_id, ts_ms=NOW - 200)])
    snap = await quality_snapshot(store, _window(), prices={"chat": Price(1.0, 3.0)})
    v1 = snap.current[GroupKey("acme", "chat", "v1", "")]
    v2 = snap.current[GroupKey("acme", "chat", "v2", "canary")]
    other = snap.current[GroupKey("other", "chat", "v1", "")]
    assert (v1["thumbs_up_rate"].value, v1["thumbs_up_rate"].n) == (1.0, 1)
    assert v2["thumbs_up_rate"].n == 0
    assert v1["mean_rating"].value == 4 and v1["correction_rate"].value == 0.5
    assert v1["error_rate"].value == 0.5 and v1["redact_rate"].value == 0.5 and other["block_rate"].value == 1.0
    assert v1["latency_p50_ms"].n == 2 and v1["tokens_per_request"].value == 40
    assert v1["cost_per_1k_tokens"].value == pytest.approx(1000 * (10 * 1 + 30 * 3) / 1000 / 40)
    assert (v2["win_rate"].value, v1["win_rate"].value) == (1.0, 0.0)
    for metrics in (v1, v2, other):
        for name, est in metrics.items():
            assert est.n >= 0 and est.ci.low <= est.ci.high, name
    assert snap.baseline == {}


def _window() -> MonitorWindow:
    return MonitorPolicy(name="w", metric="error_rate", threshold=0.1).window.at(NOW)


async def test_the_scheduler_runs_cycles_on_its_interval_fires_once_and_posts_the_alert(
        store: Store, tmp_path: Path) -> None:
    await seed(store, current_v1=(300, 0.6))
    policy_path = tmp_path / "monitors.yaml"
    policy_path.write_text(POLICY)
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
    settings = MonitorSettings(policy_path=policy_path, interval_s=0.2,
                               webhook=WebhookSettings(url=f"http://127.0.0.1:{port}/hook"))
    published: list[Event] = []

    async def publish(events: Sequence[Event]) -> None:  # as the sink would: the store sees them later
        published.extend(events)

    clock = iter(range(NOW, NOW + 10**9, 1000))
    scheduler = Scheduler(store, settings, publish, clock=lambda: next(clock), monitors={})
    await scheduler.start()
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while scheduler.cycles < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await scheduler.aclose()
    assert scheduler.cycles >= 3 and scheduler.last_error is None
    assert len([e for e in published if isinstance(e, RetrainTrigger)]) == 1
    assert [(a["event"], a["model_version"]) for a in received] == [("fired", "v1")]
    assert scheduler.health()["last"]["triggers"] == 0


async def test_results_and_the_trigger_travel_through_kafka_and_a_restarted_scheduler_does_not_fire_again(
        store: Store, tmp_path: Path) -> None:
    await seed(store, current_v1=(300, 0.6))
    policy_path = tmp_path / "monitors.yaml"
    policy_path.write_text(POLICY)
    events = EventSettings(broker=BrokerSettings(mode="embedded"), ingest=IngestSettings(batch_max_wait_s=0.1))
    pipeline = EventPipeline(events, data_dir=tmp_path, store=store)
    await pipeline.start()
    settings = MonitorSettings(policy_path=policy_path, interval_s=3600)
    try:
        assert pipeline.sink is not None
        for minute in (0, 1):  # the second scheduler is a restart: its state comes from the store
            scheduler = Scheduler(store, settings, sink_publisher(pipeline.sink), clock=lambda m=minute: NOW + m * 60_000,
                                  monitors={})
            await scheduler.start()  # the first cycle runs at once
            while scheduler.cycles == 0 and scheduler.last_error is None:
                await asyncio.sleep(0.05)
            await scheduler.aclose()
            assert scheduler.last_report is not None and len(scheduler.last_report.triggers) == (1 - minute)
            assert await pipeline.wait_stored(60), pipeline.health()
        assert await count_rows(store, "retrain_triggers") == 1
        assert await count_rows(store, "monitor_results") == 4
    finally:
        await pipeline.aclose()
