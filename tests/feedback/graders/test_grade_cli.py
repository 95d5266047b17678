"""`servoloop grade`: a cron cycle against a real embedded store (a subprocess: chDB's one-path rule), the
reproducible toxicity head, and every grader's figures on its bundled labelled set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from feedback.graders.evaluation import evaluate_all
from feedback.graders.toxicity import load_head, train_head
from feedback.monitors.embeddings import PromptEmbedder

SEED = textwrap.dedent("""
    import asyncio, sys
    from feedback.store import ChdbStore, migrate, write_events
    from schemas.events import InferenceEvent, Message, now_ms

    async def main():
        store = ChdbStore.open(sys.argv[1], "servoloop")
        await migrate(store)
        answers = ["Sure! Paris is the capital of France.", "Shut up, you worthless idiot."]
        await write_events(store, [
            InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=now_ms() - 60_000 + k,
                           messages=(Message("user", "What is the capital of France?"),), response=answers[k % 2])
            for k in range(10)])
        await store.aclose()

    asyncio.run(main())
""")
CONFIG = """
grading:
  settle_s: 0
  graders:
    toxicity: {sample_rate: 1.0}
    judge: {sample_rate: 1.0}
"""
COUNT = textwrap.dedent("""
    import asyncio, json, sys
    from feedback.store import ChdbStore

    async def main():
        store = ChdbStore.open(sys.argv[1], "servoloop")
        t = await store.query("SELECT grader, label, count() AS n FROM grades FINAL GROUP BY grader, label")
        print(json.dumps(sorted((r["grader"], r["label"], r["n"]) for r in t.to_pylist())))
        await store.aclose()

    asyncio.run(main())
""")


def test_grade_run_once_grades_the_sampled_traffic_and_a_second_run_grades_nothing_new(tmp_path: Path) -> None:
    seeded = subprocess.run([sys.executable, "-c", SEED, str(tmp_path / "chdb")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert seeded.returncode == 0, seeded.stderr
    config = tmp_path / "servoloop.yaml"
    config.write_text(CONFIG)
    env = {**os.environ, "SERVOLOOP_DATA_DIR": str(tmp_path), "SERVOLOOP_EVENTS__BROKER__MODE": "none"}
    env.pop("SERVOLOOP_CONFIG", None)
    args = [sys.executable, "-c", "from servoloop.cli import main; main()", "grade", "run", "--once", "-c", str(config)]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["graded"] == {"toxicity": 10, "judge": 10}
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.splitlines()[-1])["graded"] == {"toxicity": 0, "judge": 0}
    counted = subprocess.run([sys.executable, "-c", COUNT, str(tmp_path / "chdb")], capture_output=True, text=True,
                             timeout=120, check=False)
    assert json.loads(counted.stdout) == [["judge", "fail", 5], ["judge", "pass", 5],
                                          ["toxicity", "benign", 5], ["toxicity", "toxic", 5]]


def test_training_the_toxicity_head_again_reproduces_the_bundled_head(embedder: PromptEmbedder) -> None:
    bundled = load_head()
    again = train_head(embedder).head
    assert np.allclose(again.weights, bundled.weights, atol=1e-3)
    assert again.bias == pytest.approx(bundled.bias, abs=1e-3)
    assert again.metrics["heldout"] == bundled.metrics["heldout"]


def test_every_grader_meets_its_floor_on_its_bundled_labelled_set(embedder: PromptEmbedder) -> None:
    figures = evaluate_all(embedder)
    tox, grounded, judge = figures["toxicity"], figures["groundedness"], figures["judge"]
    assert tox["heldout"]["precision"] >= 0.9 and tox["heldout"]["recall"] >= 0.75
    assert tox["heldout"]["f1"] > tox["wordlist_baseline"]["f1"]
    assert grounded["set"]["accuracy"] >= 0.8 and grounded["set"]["precision"] >= 0.8
    assert judge["set"]["accuracy"] >= 0.9
    assert judge["pairs_consistent_both_orders"] == 1.0 and judge["pairwise_accuracy"] >= 0.9
