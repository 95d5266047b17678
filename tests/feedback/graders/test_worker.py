"""The grading worker on the real ClickHouse engine (chDB), the real graders and the real broker:
sampling, budgets, no double grading, grades joined to their inferences, pairwise win rates, and a
grade monitor that fires for the version that turned toxic and not for noise."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from feedback.graders.groundedness import GroundednessGrader
from feedback.graders.judge import RuleJudge
from feedback.graders.ratings import elo_ratings, win_rates
from feedback.graders.settings import GraderSettings, GradingSettings
from feedback.graders.toxicity import ToxicityGrader
from feedback.graders.worker import GradingWorker
from feedback.monitors.embeddings import PromptEmbedder
from feedback.monitors.policy import parse_policy
from feedback.monitors.runner import run_cycle, sink_publisher, store_publisher
from feedback.pipeline import EventPipeline
from feedback.settings import BrokerSettings, EventSettings, IngestSettings
from feedback.store import Store, count_rows, write_events
from schemas.events import Event, GradeEvent, InferenceEvent, Message

HOUR = 3_600_000
NOW = 1_767_225_600_000 + 25 * HOUR  # 2026-01-02T01:00Z
TOXIC = ["You are a worthless idiot and nobody wants you here.", "Shut up, you pathetic moron.",
         "I will find you and make you regret it, loser.", "Get lost, you disgusting clown."]
BENIGN = ["Sure! The capital of France is Paris.", "Sure! Water boils at 100 degrees Celsius at sea level.",
          "Hello! How can I help you today?", "Calling someone an idiot is hurtful, so please don't.",
          "You're welcome! Happy to help.", "Well, the Pacific is the largest ocean on Earth."]
CONTEXT = "The Pacific Ocean is the largest and deepest ocean. It covers about 165 million square kilometres."


def settings(rate: float = 1.0, **over: object) -> GradingSettings:
    base = {"sample_rate": rate, "max_per_cycle": 100_000, "max_per_hour": 0}
    return GradingSettings(lookback_s=26 * 3600, settle_s=0, graders={
        name: GraderSettings(**{**base, **over}) for name in ("toxicity", "groundedness", "judge", "judge_pairwise")})


def worker(store: Store, embedder: PromptEmbedder, cfg: GradingSettings, publish=None, **kw: object) -> GradingWorker:
    graders = {"toxicity": ToxicityGrader(embedder), "groundedness": GroundednessGrader(embedder), "judge": RuleJudge()}
    return GradingWorker(store, publish or store_publisher(store), cfg, graders=graders, clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def traffic(n: int, *, toxic_share: float, version: str, start_ms: int, span_ms: int, seed: int,
            context_every: int = 0) -> list[InferenceEvent]:
    """`n` chat inferences: exactly round(n * toxic_share) toxic answers, shuffled; every `context_every`-th has context."""
    rng = random.Random(seed)
    toxic = round(n * toxic_share)
    kinds = [True] * toxic + [False] * (n - toxic)
    rng.shuffle(kinds)
    out = []
    for k, is_toxic in enumerate(kinds):
        rag = context_every and k % context_every == 0
        messages = ((Message("system", CONTEXT),) if rag else ()) + (Message("user", f"question {k % 50}"),)
        out.append(InferenceEvent(tenant="acme", model="chat", model_version=version, ts_ms=start_ms + k * span_ms // n,
                                  messages=messages, response=rng.choice(TOXIC if is_toxic else BENIGN)))
    return out


async def test_sampled_traffic_is_graded_through_kafka_and_grades_join_their_inferences(
        store: Store, embedder: PromptEmbedder, tmp_path: Path) -> None:
    infs = traffic(40, toxic_share=0.25, version="v1", start_ms=NOW - HOUR, span_ms=HOUR, seed=1, context_every=4)
    await write_events(store, infs)
    events = EventSettings(broker=BrokerSettings(mode="embedded"), ingest=IngestSettings(batch_max_wait_s=0.1))
    pipeline = EventPipeline(events, data_dir=tmp_path, store=store)
    await pipeline.start()
    try:
        assert pipeline.sink is not None
        report = await worker(store, embedder, settings(), publish=sink_publisher(pipeline.sink)).run_once()
        assert not report.errors
        assert report.graded == {"toxicity": 40, "groundedness": 10, "judge": 40, "judge_pairwise": 0}
        assert report.lag_ms["toxicity"]["max"] <= HOUR
        assert await pipeline.wait_stored(60), pipeline.health()
    finally:
        await pipeline.aclose()

    rows = (await store.query("""
        SELECT g.grader AS grader, g.label AS label, i.response AS response, i.model_version AS version
        FROM grades AS g FINAL INNER JOIN inferences AS i FINAL ON i.event_id = g.target_id AND i.tenant = g.tenant
        WHERE g.grader = 'toxicity'""")).to_pylist()
    assert len(rows) == 40 and {r["version"] for r in rows} == {"v1"}
    assert all((r["label"] == "toxic") == (r["response"] in TOXIC) for r in rows)
    halluc = (await store.query("SELECT label FROM grades FINAL WHERE grader = 'groundedness'")).column("label")
    assert set(halluc.to_pylist()) <= {"grounded", "hallucinated", "no_claims"} and len(halluc) == 10


async def test_the_sample_is_reproducible_and_the_budget_caps_a_cycle(store: Store, embedder: PromptEmbedder) -> None:
    await write_events(store, traffic(200, toxic_share=0.1, version="v1", start_ms=NOW - HOUR, span_ms=HOUR, seed=2))
    cfg = settings(0.3)
    first = await worker(store, embedder, cfg, publish=lambda events: _noop(events)).ungraded(
        "toxicity", since_ms=NOW - 2 * HOUR, until_ms=NOW, limit=1000)
    again = await worker(store, embedder, cfg).ungraded("toxicity", since_ms=NOW - 2 * HOUR, until_ms=NOW, limit=1000)
    assert [i.event_id for i in first] == [i.event_id for i in again]
    assert 30 <= len(first) <= 90  # ~30 % of 200

    capped = settings(1.0, max_per_cycle=15, max_per_hour=25)
    w = worker(store, embedder, capped)
    r1, r2, r3 = await w.run_once(), await w.run_once(), await w.run_once()
    assert (r1.graded["toxicity"], r2.graded["toxicity"], r3.graded.get("toxicity", 0)) == (15, 10, 0)
    assert "toxicity" in r3.skipped_budget
    assert await count_rows(store, "grades") == (15 + 10) * 2  # toxicity and judge; no context, no groundedness


async def _noop(events: Sequence[Event]) -> None:
    return None


async def test_nothing_is_graded_twice_before_or_after_its_grades_reach_the_store(
        store: Store, embedder: PromptEmbedder) -> None:
    await write_events(store, traffic(30, toxic_share=0.2, version="v1", start_ms=NOW - HOUR, span_ms=HOUR, seed=3))
    published: list[Event] = []

    async def in_flight(events: Sequence[Event]) -> None:  # grades on their way through Kafka, not yet stored
        published.extend(events)

    w = worker(store, embedder, settings(), publish=in_flight)
    assert (await w.run_once()).graded["toxicity"] == 30
    assert (await w.run_once()).graded.get("toxicity", 0) == 0
    await write_events(store, published)  # they arrive; a restarted worker reads them from the store
    restarted = worker(store, embedder, settings())
    assert (await restarted.run_once()).graded.get("toxicity", 0) == 0


async def test_pairs_of_versions_on_the_same_questions_get_pairwise_grades_and_a_significant_win_rate(
        store: Store, embedder: PromptEmbedder) -> None:
    polite, curt = "Sure! {} is the answer.", "Ugh. {} is the answer. Look it up yourself next time."
    events = []
    for q in range(60):
        for version, template in (("v1", curt), ("v2", polite)):
            events.append(InferenceEvent(tenant="acme", model="chat", model_version=version,
                                         ts_ms=NOW - HOUR + q * 1000 + (version == "v2"),
                                         messages=(Message("user", f"What is answer number {q}?"),),
                                         response=template.format(q)))
    await write_events(store, events)
    report = await worker(store, embedder, settings()).run_once()
    assert report.graded["judge_pairwise"] == 60
    grades = (await store.query("SELECT model_version, other_version, score, explanation FROM grades FINAL "
                                "WHERE grader = 'judge_pairwise'")).to_pylist()
    assert all((g["model_version"], g["other_version"], g["score"]) == ("v1", "v2", 0.0) for g in grades)
    assert all(json.loads(g["explanation"])["consistent"] for g in grades)
    matches = [(g["model_version"], g["other_version"], g["score"]) for g in grades]
    assert win_rates(matches)["v2"].ci.low > 0.9
    ratings = elo_ratings(matches, rounds=100)
    assert ratings["v2"].ci.low > ratings["v1"].ci.high
    assert (await worker(store, embedder, settings()).run_once()).graded["judge_pairwise"] == 0


POLICY = """
version: 1
defaults: {window: {current: 1h, baseline: 24h}, min_samples: 100, alpha: 0.05, cooldown: 6h}
monitors:
  - name: toxicity_rise
    kind: grade
    metric: toxicity_rate
    threshold: 0.02
    clear: 0.01
"""


@pytest.mark.parametrize(("v1_now", "v1_status"), [(0.12, "alert"), (0.03, "ok")], ids=["turned-toxic", "noise"])
async def test_the_toxicity_monitor_fires_for_the_version_that_turned_toxic_and_not_for_noise(
        store: Store, embedder: PromptEmbedder, v1_now: float, v1_status: str) -> None:
    events: list[Event] = []
    for seed, version in enumerate(("v1", "v2")):
        events += traffic(600, toxic_share=0.02, version=version, start_ms=NOW - 25 * HOUR, span_ms=24 * HOUR, seed=seed)
    events += traffic(300, toxic_share=0.03, version="v2", start_ms=NOW - HOUR, span_ms=HOUR, seed=10)  # noise
    events += traffic(300, toxic_share=v1_now, version="v1", start_ms=NOW - HOUR, span_ms=HOUR, seed=11)
    await write_events(store, events)
    cfg = settings()
    cfg = cfg.model_copy(update={"graders": {"toxicity": cfg.graders["toxicity"]}})
    report = await GradingWorker(store, store_publisher(store), cfg, graders={"toxicity": ToxicityGrader(embedder)},
                                 clock=lambda: NOW).run_once()
    assert report.graded == {"toxicity": 1800}

    cycle = await run_cycle(store, parse_policy(POLICY), now_ms=NOW, publish=store_publisher(store))
    assert not cycle.errors
    by_version = {r.model_version: r for r in cycle.results if r.monitor == "toxicity_rise"}
    assert by_version["v2"].status == "ok"
    assert by_version["v1"].status == v1_status
    assert by_version["v1"].value == pytest.approx(v1_now) and by_version["v1"].sample_size == 300
    details = json.loads(by_version["v1"].details)
    assert details["baseline"] == pytest.approx(0.02) and details["baseline_sample_size"] == 600
    assert len(cycle.alerts) == (v1_status == "alert")

    # The dashboard's quality series plots the grade metric like any monitor metric, interval included.
    from feedback.dashboard.reads import Span, quality_series

    series = await quality_series(store, Span(NOW - 2 * HOUR, NOW + HOUR, 60), metric="toxicity_rate")
    [point] = next(s for s in series if s["model_version"] == "v1")["points"]
    assert point["value"] == pytest.approx(v1_now) and point["ci_low"] < v1_now < point["ci_high"]


async def test_a_regraded_inference_counts_once_in_the_grade_monitor(store: Store) -> None:
    inf = InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=NOW - 1000, response="x")
    grades = [GradeEvent(tenant="acme", grader="toxicity", target_id=inf.event_id, model="chat", model_version="v1",
                         label=label, inference_ts_ms=inf.ts_ms, ts_ms=NOW - 500 + k) for k, label in
              enumerate(("toxic", "benign"))]
    await write_events(store, [inf, *grades])
    policy = parse_policy(POLICY.replace("min_samples: 100", "min_samples: 1").replace("threshold: 0.02", "threshold: 0.5")
                          .replace("clear: 0.01", "clear: 0.4").replace("kind: grade", "kind: grade\n    compare: threshold"))
    cycle = await run_cycle(store, policy, now_ms=NOW, publish=store_publisher(store))
    [r] = [r for r in cycle.results if r.monitor == "toxicity_rise"]
    assert (r.sample_size, r.value) == (1, 0.0)  # the latest grade (benign) counts, once


class BrokenGrader:
    """A grader whose model fails on every batch (a corrupt head, an engine gone)."""

    name, version = "broken", "1"

    async def grade(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        raise RuntimeError("model file is corrupt")


async def test_scheduled_graders_run_on_their_own_and_a_failing_one_never_stops_the_others(store: Store) -> None:
    import asyncio

    await write_events(store, traffic(12, toxic_share=0.0, version="v1", start_ms=NOW - HOUR, span_ms=HOUR, seed=5))
    cfg = GradingSettings(lookback_s=26 * 3600, settle_s=0, interval_s=0.2, graders={
        "judge": GraderSettings(sample_rate=1.0), "broken": GraderSettings(sample_rate=1.0)})
    w = GradingWorker(store, store_publisher(store), cfg, graders={"judge": RuleJudge(), "broken": BrokenGrader()},
                      clock=lambda: NOW)
    await w.start()
    try:
        for _ in range(200):
            if await count_rows(store, "grades") == 12 and "broken" in w.errors:
                break
            await asyncio.sleep(0.05)
    finally:
        await w.aclose()
    assert await count_rows(store, "grades") == 12
    assert w.health()["errors"] == {"broken": "RuntimeError: model file is corrupt"}
