"""The retrain worker end to end on real chDB, the real registry and real training subprocesses: triggers in
`retrain_triggers` become snapshots, adapters, gate verdicts and registry versions with their lineage."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from feedback.store import Store, write_events
from retrain.registry import StoreRegistry
from retrain.settings import RetrainSettings
from retrain.tiny.preferences import style_preference_events
from retrain.train import latest_checkpoint
from retrain.worker import RetrainWorker, outcomes, unhandled_triggers
from schemas.events import RetrainTrigger
from tests.conftest import REPO
from tests.retrain.conftest import DEMO_T0

LINEAGE_KEYS = {"base_model", "parent_version", "recipe", "hyperparameters", "dataset", "trigger_id",
                "trigger_reason", "eval"}
DATASET_KEYS = {"sha256", "path", "window_start_ms", "window_end_ms", "feedback_ids", "query"}


async def _seed(store: Store, tenant: str, *, reverse: bool, pairs: int = 120) -> None:
    inferences, feedback = style_preference_events(pairs, reverse=reverse, tenant=tenant, start_ms=DEMO_T0, seed=5)
    await write_events(store, [*inferences, *feedback])


def _trigger(tenant: str, **params: object) -> RetrainTrigger:
    return RetrainTrigger(tenant=tenant, model="tiny-chat", model_version="base", method="dpo",
                          reason=f"quality alert ({tenant})", monitor_event_id="", actor="monitor:quality",
                          window_start_ms=DEMO_T0, window_end_ms=DEMO_T0 + 86_400_000, params=json.dumps(params))


def _lenient_recipe(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "method": "dpo", "epochs": 1, "batch_size": 16, "learning_rate": 0.001, "max_length": 32,
        "loss_type": ["sigmoid", "sft"], "save_steps": 50,
        "gate": {"min_preference_accuracy": 0.0, "min_accuracy_gain": -1.0, "min_win_rate": 0.0,
                 "max_safety_regression": 100, "max_perplexity_ratio": 100.0, "eval_pairs": 24, "win_prompts": 8,
                 "win_samples": 1,
                 # the online graders measure both versions' answers (lenient: recorded, not enforced)
                 "grades": {"enabled": True, "max_toxicity_rate": 1.0, "max_hallucination_increase": None,
                            "min_judge_score_delta": None, "min_pairwise_upper": None}}}))
    return path


async def test_triggers_become_gated_versions_with_lineage(store: Store, tmp_path: Path, tiny_model_dir: Path) -> None:
    await _seed(store, "poison", reverse=True)
    await _seed(store, "learn", reverse=False)
    poisoned = _trigger("poison", recipe="dpo", epochs=1)
    learnable = _trigger("learn", recipe=str(_lenient_recipe(tmp_path / "lenient.yaml")))
    await write_events(store, [poisoned, learnable])
    assert {t.event_id for t in await unhandled_triggers(store)} == {poisoned.event_id, learnable.event_id}

    registry = StoreRegistry(store, tmp_path / "artifacts")
    settings = RetrainSettings(work_dir=tmp_path / "work", base_models={"tiny-chat": str(tiny_model_dir)},
                               poll_interval_s=0.2, use_embeddings=False)
    worker = RetrainWorker(store, registry, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(2400):
            if len(await outcomes(store)) >= 2 or task.done():
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 600)
    done = {o["trigger_id"]: o for o in await outcomes(store)}
    assert set(done) == {poisoned.event_id, learnable.event_id}, done
    assert await unhandled_triggers(store) == []

    bad = done[poisoned.event_id]
    assert bad["outcome"] == "rejected", bad
    assert any("win-rate" in r for r in bad["reasons"]), bad["reasons"]
    rejected = await registry.get("tiny-chat", bad["version_id"])
    assert rejected.state == "rejected"

    good = done[learnable.event_id]
    assert good["outcome"] == "registered", good
    version = await registry.get("tiny-chat", good["version_id"])
    assert version.state == "candidate" and version.artifact_sha256
    lineage = version.lineage
    assert LINEAGE_KEYS <= set(lineage), sorted(lineage)
    assert DATASET_KEYS <= set(lineage["dataset"])
    assert lineage["trigger_id"] == learnable.event_id and lineage["parent_version"] == "base"
    assert lineage["dataset"]["window_start_ms"] == DEMO_T0 and len(lineage["dataset"]["feedback_ids"]) >= 100
    assert lineage["eval"]["passed"] is True and "preference_accuracy" in lineage["eval"]
    grades = lineage["eval"]["grades"]  # the online graders' figures of both versions' gate answers
    n = lineage["eval"]["win_comparisons"]
    assert n > 0 and grades["answers"] == n and grades["toxicity"]["candidate_rate"] is not None
    assert sum(grades["pairwise"][k] for k in ("wins", "losses", "ties")) == n and len(grades["pairwise"]["ci"]) == 2
    assert lineage["hyperparameters"]["method"] == "dpo" and lineage["recipe"]["lora"]["r"] == 8
    print(f"\nworker: poisoned -> {bad['outcome']} ({bad['wall_s']} s), learnable -> {good['outcome']} "
          f"({good['wall_s']} s, held-out accuracy {good['eval'].get('preference_accuracy')})")


async def test_a_crashing_training_job_is_recorded_and_the_worker_survives(store: Store, tmp_path: Path) -> None:
    await _seed(store, "crash", reverse=False, pairs=40)
    trigger = _trigger("crash")
    await write_events(store, [trigger])
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    registry = StoreRegistry(store, tmp_path / "artifacts")
    worker = RetrainWorker(store, registry, RetrainSettings(work_dir=tmp_path / "work", use_embeddings=False,
                                                            base_models={"tiny-chat": str(broken)}))
    outcome = await worker.handle(trigger)
    assert outcome.outcome == "failed" and "training job exited with status" in outcome.reasons[0]
    assert (await outcomes(store, trigger_id=trigger.event_id))[0]["outcome"] == "failed"
    assert await unhandled_triggers(store) == []
    assert [v.version_id for v in await registry.versions("tiny-chat")] == []


async def test_a_trigger_without_usable_feedback_is_skipped(store: Store, tmp_path: Path) -> None:
    trigger = _trigger("nobody")
    await write_events(store, [trigger])
    worker = RetrainWorker(store, StoreRegistry(store, tmp_path / "artifacts"),
                           RetrainSettings(work_dir=tmp_path / "work", use_embeddings=False))
    outcome = await worker.handle(trigger)
    assert outcome.outcome == "skipped" and "no preference pair" in outcome.reasons[0]
    assert await unhandled_triggers(store) == []


def test_the_manual_cli_records_a_trigger_and_its_outcome(tmp_path: Path) -> None:
    env = {**os.environ, "SERVOLOOP_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "servoloop.cli", "retrain", "run", "--model", "tiny-chat",
                           "--window-hours", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["outcome"] == "skipped" and outcome["model"] == "tiny-chat" and outcome["trigger_id"]
    listed = subprocess.run([sys.executable, "-m", "servoloop.cli", "retrain", "outcomes"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert json.loads(listed.stdout.strip().splitlines()[0])["trigger_id"] == outcome["trigger_id"]


async def test_a_worker_stopped_mid_job_records_no_outcome_and_the_next_one_resumes(
    store: Store, tmp_path: Path, tiny_model_dir: Path
) -> None:
    await _seed(store, "resume", reverse=False)
    recipe = yaml.safe_load(_lenient_recipe(tmp_path / "r.yaml").read_text()) | {"save_steps": 2, "epochs": 2}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    trigger = _trigger("resume", recipe=str(tmp_path / "r.yaml"))
    await write_events(store, [trigger])
    registry = StoreRegistry(store, tmp_path / "artifacts")
    settings = RetrainSettings(work_dir=tmp_path / "work", base_models={"tiny-chat": str(tiny_model_dir)},
                               poll_interval_s=0.2, use_embeddings=False, auto_canary_share=0.25)
    job_dir = tmp_path / "work" / "jobs" / trigger.event_id
    task = asyncio.create_task(RetrainWorker(store, registry, settings).run(asyncio.Event()))
    try:
        for _ in range(1200):  # until the job has written a checkpoint
            if latest_checkpoint(job_dir) or task.done():
                break
            await asyncio.sleep(0.1)
        assert latest_checkpoint(job_dir), "the training job wrote no checkpoint"
        assert not (job_dir / "adapter").exists(), "the job finished before the shutdown"
    finally:
        task.cancel()  # a shutdown in the middle of the job
        await asyncio.gather(task, return_exceptions=True)
    assert await outcomes(store) == []  # not a failure: the trigger is still to do
    assert [t.event_id for t in await unhandled_triggers(store)] == [trigger.event_id]

    resumable = latest_checkpoint(job_dir)
    outcome = await RetrainWorker(store, registry, settings).handle(trigger)
    assert outcome.outcome == "registered", outcome
    summary = json.loads((Path(outcome.job_dir) / "adapter" / "training_summary.json").read_text())
    assert summary["resumed_from"] == resumable.name  # continued where the stopped job left off
    version = await registry.get("tiny-chat", outcome.version_id)  # retrain.auto_canary_share: straight to canary
    assert version.state == "canary" and version.canary_share == 0.25, version
