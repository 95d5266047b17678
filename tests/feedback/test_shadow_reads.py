"""Shadow replays (`InferenceEvent.shadow`, served to nobody) stay out of what describes served traffic: the
dashboard's request and latency series, the per-version statistics, and the guardrail-flagged answers a
training dataset is built from, and the requests drift compares. Real chDB."""

from __future__ import annotations

from feedback.dashboard.reads import Span, latency_cost
from feedback.monitors.base import TimeRange
from feedback.monitors.request_features import Group, sample_window, window_groups
from feedback.store import Store, version_stats, write_events
from retrain.datasets import DatasetFilters, read_rows
from schemas.events import InferenceEvent, Message

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000


def _served_and_shadow() -> tuple[list[InferenceEvent], list[InferenceEvent]]:
    msgs = (Message(role="user", content="my card number please"),)
    served = [InferenceEvent(ts_ms=T0 + i, tenant="acme", model="m", model_version="v1", messages=msgs,
                             response="redacted answer", output_action="redact", latency_ms=10.0)
              for i in range(3)]
    shadow = [InferenceEvent(ts_ms=T0 + 10 + i, tenant="acme", model="m", model_version="v2", messages=msgs,
                             response="candidate answer", output_action="redact", latency_ms=900.0,
                             shadow=True, shadow_of=s.event_id)
              for i, s in enumerate(served)]
    return served, shadow


async def test_shadow_rows_are_not_served_traffic(store: Store) -> None:
    served, shadow = _served_and_shadow()
    await write_events(store, [*served, *shadow])

    series = await latency_cost(store, Span(T0, T0 + MINUTE, 60), tenant="acme")
    assert [(s["model"], sum(p["requests"] for p in s["points"])) for s in series] == [("m", 3)]
    assert series[0]["points"][0]["p99_ms"] == 10.0  # the shadow's 900 ms is not the served latency

    stats = await version_stats(store, start_ms=T0, end_ms=T0 + MINUTE, tenant="acme")
    assert [(s.model_version, s.requests) for s in stats] == [("v1", 3)]

    rows = await read_rows(store, DatasetFilters(start_ms=T0, end_ms=T0 + MINUTE, tenant="acme",
                                                 sources=("guardrail",), use_embeddings=False))
    assert sorted(rows.inferences) == sorted(s.event_id for s in served)

    window = TimeRange(start_ms=T0, end_ms=T0 + MINUTE)
    assert await window_groups(store, window, per_version=True) == [Group("m", "v1")]
    sample = await sample_window(store, window, Group("m"), rows=100, prompts=100)
    assert sample.rows == 3 and len(sample.frame) == 3
    assert sorted(sample.prompts.event_ids) == sorted(s.event_id for s in served)
