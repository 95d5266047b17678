"""Lineage on real chDB: from a served response's inference id back to the trigger, dataset and feedback rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from feedback.store import Store, write_events
from retrain.lineage import inference_lineage, version_lineage
from retrain.registry import StoreRegistry
from schemas.errors import NotFound
from schemas.events import FeedbackEvent, InferenceEvent, MonitorResult, RetrainTrigger, now_ms

MODEL = "chat"
MIN = 60_000


@dataclass
class Chain:
    served: InferenceEvent  # answered by the new version
    trigger: RetrainTrigger
    monitor: MonitorResult
    window_feedback: list[FeedbackEvent]  # feedback on v1 inside the window (the dataset's source)
    listed: list[FeedbackEvent]  # the subset listed by id in the second version's dataset
    dataset: dict


async def seed_chain(store: Store, registry: StoreRegistry, adapter: Path) -> Chain:
    """v1 active serves; its feedback sinks; a monitor alerts; a trigger fires; v2 is trained, promoted, serves."""
    t0 = now_ms() - 120 * MIN
    v1 = await registry.register_candidate(model=MODEL, base_model="tiny-chat", adapter_dir=adapter, lineage={},
                                           actor="trainer", version_id="v1")
    await registry.promote(MODEL, v1.version_id, actor="ops")
    served_v1 = [InferenceEvent(tenant="acme", ts_ms=t0 + i * MIN, model=MODEL, model_version="v1", response=f"r{i}")
                 for i in range(6)]
    other_model = InferenceEvent(tenant="acme", ts_ms=t0, model="other", model_version="v1")
    feedback = [FeedbackEvent(tenant="acme", ts_ms=e.ts_ms + 1000, target_id=e.event_id, kind="thumbs",
                              thumbs=i % 3 != 0) for i, e in enumerate(served_v1)]
    late = FeedbackEvent(tenant="acme", ts_ms=t0 + 90 * MIN, target_id=served_v1[0].event_id, kind="thumbs",
                         thumbs=False)  # outside the window
    off = FeedbackEvent(tenant="acme", ts_ms=t0 + 1000, target_id=other_model.event_id, kind="thumbs", thumbs=False)
    monitor = MonitorResult(ts_ms=t0 + 31 * MIN, monitor="satisfaction_drop", metric="thumbs_up_rate", model=MODEL,
                            model_version="v1", window_start_ms=t0, window_end_ms=t0 + 30 * MIN, value=0.55,
                            threshold=0.7, status="alert", sample_size=6, details=json.dumps({"ci_low": 0.2}))
    trigger = RetrainTrigger(ts_ms=t0 + 32 * MIN, model=MODEL, model_version="v1", method="dpo",
                             reason="thumbs up rate 0.55 < 0.7", monitor_event_id=monitor.event_id,
                             window_start_ms=t0, window_end_ms=t0 + 30 * MIN, actor="monitor:satisfaction_drop")
    await write_events(store, [*served_v1, other_model, *feedback, late, off, monitor, trigger])
    dataset = {"sha256": "d" * 64, "path": "/data/snapshots/chat-1.parquet", "window_start_ms": t0,
               "window_end_ms": t0 + 30 * MIN, "query": "thumbs pairs, model chat@v1", "counts": {"pairs": 3}}
    lineage = {"parent_version": "v1", "trigger_id": trigger.event_id, "dataset": dataset,
               "recipe": {"name": "dpo-lora", "method": "dpo", "hyperparameters": {"beta": 0.1, "epochs": 1}},
               "eval": {"passed": True, "metrics": {"pref_acc": 0.93}}}
    await registry.register_candidate(model=MODEL, base_model="tiny-chat", adapter_dir=adapter, lineage=lineage,
                                      actor="retrain-worker", version_id="v2")
    await registry.start_canary(MODEL, "v2", share=0.1, actor="ops")
    await registry.promote(MODEL, "v2", actor="canary-monitor", reason="not worse after 200 samples",
                           evidence={"samples": 200})
    served_v2 = InferenceEvent(tenant="acme", model=MODEL, model_version="v2", response="better")
    await write_events(store, [served_v2])
    listed = feedback[:2]
    await registry.register_candidate(
        model=MODEL, base_model="tiny-chat", adapter_dir=adapter, actor="retrain-worker", version_id="v3",
        lineage={"parent_version": "v2", "dataset": {**dataset, "feedback_ids": [f.event_id for f in listed]}})
    return Chain(served_v2, trigger, monitor, feedback, listed, dataset)


async def test_an_inference_id_leads_to_the_trigger_its_evidence_the_dataset_and_the_feedback_rows(
        store: Store, tmp_path: Path, tiny_lora: Path):
    registry = StoreRegistry(store, tmp_path / "artifacts")
    chain = await seed_chain(store, registry, tiny_lora)
    out = await inference_lineage(store, chain.served.event_id)
    assert out["inference"]["event_id"] == chain.served.event_id and out["inference"]["model_version"] == "v2"
    v = out["version"]
    assert v["version_id"] == "v2" and v["state"] == "active" and v["promoted_by"] == "canary-monitor"
    assert v["artifact_sha256"] and v["lineage"]["artifact_sha256"] == v["artifact_sha256"]
    assert v["lineage"]["recipe"]["hyperparameters"]["beta"] == 0.1 and v["lineage"]["eval"]["passed"] is True
    assert v["parent"] == {"version_id": "v1", "state": "retired", "artifact_sha256": v["artifact_sha256"]}
    assert [h["state"] for h in v["history"]] == ["candidate", "canary", "active"]
    assert v["trigger_id"] == chain.trigger.event_id and v["trigger"]["reason"] == chain.trigger.reason
    assert v["monitor_result"]["event_id"] == chain.monitor.event_id
    assert v["monitor_result"]["status"] == "alert" and v["monitor_result"]["details"] == {"ci_low": 0.2}
    assert v["dataset"]["sha256"] == "d" * 64
    # the dataset window's feedback on chat@v1: not the late one, not the other model's
    assert v["feedback"]["source"] == "window" and v["feedback"]["count"] == len(chain.window_feedback)
    assert [r["event_id"] for r in v["feedback"]["rows"]] == [f.event_id for f in chain.window_feedback]
    assert [r["thumbs"] for r in v["feedback"]["rows"]] == [f.thumbs for f in chain.window_feedback]


async def test_listed_feedback_ids_are_the_exact_source_and_unknowns_are_not_found(store: Store, tmp_path: Path,
                                                                                   tiny_lora: Path):
    registry = StoreRegistry(store, tmp_path / "artifacts")
    chain = await seed_chain(store, registry, tiny_lora)
    v3 = await version_lineage(store, MODEL, "v3")
    assert v3["feedback"]["source"] == "feedback_ids"
    assert sorted(r["event_id"] for r in v3["feedback"]["rows"]) == sorted(f.event_id for f in chain.listed)
    assert v3["trigger"] is None and v3["state"] == "candidate" and v3["promoted_by"] is None
    with pytest.raises(NotFound, match="no inference"):
        await inference_lineage(store, "0000-none")
    with pytest.raises(NotFound, match="has no version 'v9'"):
        await version_lineage(store, MODEL, "v9")
    # a response of a version the registry does not know (e.g. served before any registration) says so
    stray = InferenceEvent(tenant="acme", model="unregistered", model_version="")
    await write_events(store, [stray])
    out = await inference_lineage(store, stray.event_id)
    assert out["version"] is None and "not in the registry" in out["note"]
