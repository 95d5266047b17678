"""The loop closed once, in process, on real parts, and its lineage read back from a served answer.

Learnable preference feedback sits in chDB; a retrain trigger names its window; the retrain worker snapshots
the dataset, trains a DPO LoRA in a subprocess, gates it and registers it; the registry promotes it; a gateway
(Transformers engine on the tiny model, following the store's model events, its events going through the
pipeline into the same store) serves the new version. From that answer's inference id, the lineage names the
version, the trigger, the dataset snapshot and the very feedback rows the adapter was trained on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from feedback.pipeline import EventPipeline
from feedback.settings import EventSettings, IngestSettings
from feedback.store import Store, get_inferences, write_events
from gateway.auth import KeyStore
from gateway.engines import Engine
from retrain.lineage import inference_lineage
from retrain.registry import StoreRegistry
from retrain.settings import RetrainSettings
from retrain.tiny.preferences import style_preference_events
from retrain.worker import RetrainWorker
from schemas.events import RetrainTrigger
from tests.gateway.conftest import RunningGateway, store_following_gateway

MODEL = "tiny-chat"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the seeded feedback window


@pytest.fixture
async def serving(keystore: KeyStore, tiny_model_dir: Path, transformers_engine: Engine, store: Store,
                  tmp_path: Path) -> AsyncIterator[RunningGateway]:
    pipeline = EventPipeline(EventSettings(broker={"mode": "none"}, ingest=IngestSettings(batch_max_wait_s=0.1)),
                             data_dir=tmp_path / "events", store=store)
    await pipeline.start()
    async with store_following_gateway(keystore, tiny_model_dir, transformers_engine, store, tmp_path / "adapters",
                                       model=MODEL, events=pipeline.sink) as running:
        yield running
    await pipeline.aclose()


async def _ask(gw: RunningGateway, key: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{gw.http}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                  "messages": [{"role": "user", "content": "How do I reset my password?"}]})
    assert r.status_code == 200, r.text
    return r


async def test_a_served_answer_leads_back_to_the_trigger_dataset_and_feedback_behind_its_adapter(
        serving: RunningGateway, store: Store, tiny_model_dir: Path, tmp_path: Path) -> None:
    inferences, feedback = style_preference_events(120, tenant="loop", model=MODEL, start_ms=T0, seed=3)
    trigger = RetrainTrigger(tenant="loop", model=MODEL, model_version="base", method="dpo", reason="satisfaction gap",
                             window_start_ms=T0, window_end_ms=T0 + 86_400_000, actor="monitor:quality",
                             params=json.dumps({"recipe": str(tmp_path / "recipe.yaml")}))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({  # a short run; the gate's bounds as loose as its checks
        "method": "dpo", "epochs": 1, "batch_size": 16, "learning_rate": 0.001, "max_length": 32,
        "loss_type": ["sigmoid", "sft"], "gate": {"min_preference_accuracy": 0.0, "min_accuracy_gain": -1.0,
                                                   "min_win_rate": 0.0, "max_safety_regression": 100,
                                                   "max_perplexity_ratio": 100.0, "eval_pairs": 16, "win_prompts": 4,
                                                   "win_samples": 1}}))
    await write_events(store, [*inferences, *feedback, trigger])
    key = serving.key(tenant="loop")
    assert (await _ask(serving, key)).headers["x-servoloop-model-version"] == "base"

    registry = StoreRegistry(store, tmp_path / "artifacts")
    worker = RetrainWorker(store, registry, RetrainSettings(work_dir=tmp_path / "work", use_embeddings=False,
                                                            base_models={MODEL: str(tiny_model_dir)}))
    outcome = await worker.handle(trigger)
    assert outcome.outcome == "registered", outcome
    await registry.promote(MODEL, outcome.version_id, actor="ops", reason="loop test")

    for _ in range(200):  # the gateway follows the store's model events
        answer = await _ask(serving, key)
        if answer.headers["x-servoloop-model-version"] == outcome.version_id:
            break
        await asyncio.sleep(0.1)
    assert answer.headers["x-servoloop-model-version"] == outcome.version_id
    inference_id = answer.headers["x-servoloop-inference-id"]
    for _ in range(200):  # through the pipeline into the store
        if await get_inferences(store, tenant="loop", event_ids=[inference_id]):
            break
        await asyncio.sleep(0.1)

    lineage = await inference_lineage(store, inference_id)
    assert lineage["inference"]["model_version"] == outcome.version_id
    version = lineage["version"]
    assert version["version_id"] == outcome.version_id and version["state"] == "active"
    assert version["promoted_by"] == "ops" or version["history"][-1]["actor"] == "ops"
    assert version["trigger_id"] == trigger.event_id and version["trigger"]["event_id"] == trigger.event_id
    assert version["dataset"]["sha256"] == outcome.dataset["sha256"]
    trained_on = {f["event_id"] for f in version["feedback"]["rows"]}
    rated = {f.event_id for f in feedback}
    assert version["feedback"]["count"] > 0 and trained_on <= rated  # the rows the pairs came from: seeded ratings
