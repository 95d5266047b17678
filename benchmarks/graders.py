"""Online graders: accuracy on the bundled labelled sets, throughput per CPU core, and grading lag under load.

    .venv/bin/python benchmarks/graders.py                 # ≈3 min: accuracy, throughput, 90 s of 200 req/s
    .venv/bin/python benchmarks/graders.py --quick         # smoke run (20 s of load)

1. Accuracy: `feedback.graders.evaluation.evaluate_all` (what `servoloop grade eval` prints).
2. Throughput per core: each grader on realistic answers with torch limited to one thread (texts/s on
   one core), then with every thread.
3. Lag: a writer appends `--rate` inferences per second (30 % with reference context) to a fresh chDB
   store for `--duration` seconds while a `GradingWorker` with the default `grading:` settings (sampling
   10 % / 10 % / 5 %, a cycle every 10 s) grades them into the same store; lag = grade time - inference
   time over every grade written, and whether the worker kept up (nothing sampled left ungraded).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import pct, write_result


def _answers(n: int, seed: int = 0) -> list[str]:
    from feedback.graders.toxicity_set import build_examples

    rows = build_examples(seed + 100, per_template=max(1, n // 50))
    random.Random(seed).shuffle(rows)
    return [str(r["text"]) for r in rows][:n]


def throughput(n: int) -> dict[str, Any]:
    import torch

    from feedback.graders.groundedness import GroundednessGrader
    from feedback.graders.judge import load_rubric, score_answer
    from feedback.graders.toxicity import ToxicityGrader
    from feedback.monitors.embeddings import PromptEmbedder

    embedder = PromptEmbedder()
    embedder.load()
    tox = ToxicityGrader(embedder)
    ground = GroundednessGrader(embedder)
    rubric = load_rubric()
    texts = _answers(n)
    context = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is 330 metres tall. "
               "It was designed by the company of Gustave Eiffel and was the tallest structure until 1930.")
    out: dict[str, Any] = {}
    threads = torch.get_num_threads()
    for label, n_threads in (("one_core", 1), ("all_cores", threads)):
        torch.set_num_threads(n_threads)
        tox.score_texts(texts[:32])  # warm up
        t = time.perf_counter()
        tox.score_texts(texts)
        tox_s = time.perf_counter() - t
        t = time.perf_counter()
        for a in texts[: n // 4]:
            ground.check(a, context)
        ground_s = time.perf_counter() - t
        t = time.perf_counter()
        for a in texts:
            score_answer("What is the capital of France?", a, rubric)
        judge_s = time.perf_counter() - t
        out[label] = {"threads": n_threads, "toxicity_answers_per_s": round(len(texts) / tox_s, 1),
                      "groundedness_answers_per_s": round((n // 4) / ground_s, 1),
                      "judge_answers_per_s": round(len(texts) / judge_s, 1)}
    torch.set_num_threads(threads)
    return out


async def lag(rate: int, duration_s: float) -> dict[str, Any]:
    from feedback.graders.settings import GradingSettings
    from feedback.graders.worker import GradingWorker
    from feedback.monitors.runner import store_publisher
    from feedback.store import ChdbStore, migrate, write_events
    from schemas.events import InferenceEvent, Message, now_ms

    tmp = tempfile.mkdtemp(prefix="servoloop-graders-bench-")
    store = ChdbStore.open(str(Path(tmp) / "chdb"), "servoloop")
    await migrate(store)
    settings = GradingSettings()  # the defaults: what `servoloop grade run` does out of the box
    worker = GradingWorker(store, store_publisher(store), settings)
    await worker.graders()  # load the embedding model before the clock starts
    answers = _answers(400, seed=1)
    context = "The Pacific Ocean is the largest and deepest ocean. It covers about 165 million square kilometres."
    rng = random.Random(2)
    written = 0

    async def writer() -> None:
        nonlocal written
        start = time.monotonic()
        second = 0
        while time.monotonic() - start < duration_s:
            batch = []
            for _ in range(rate):
                rag = rng.random() < 0.3
                messages = ((Message("system", context),) if rag else ()) + (Message("user", "Tell me something."),)
                batch.append(InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=now_ms(),
                                            messages=messages, response=rng.choice(answers)))
            await write_events(store, batch)
            written += len(batch)
            second += 1
            await asyncio.sleep(max(0.0, start + second - time.monotonic()))

    await worker.start()
    await writer()
    start_wait = time.monotonic()
    # Let the worker catch up with the last writes (each grader on its own schedule).
    end = time.monotonic() + settings.interval_s + 120
    caught_up_s = None
    while time.monotonic() < end:
        left = [len(await worker.ungraded(n, since_ms=0, until_ms=now_ms() - 3_000, limit=1))
                for n in ("toxicity", "groundedness", "judge")]
        if not any(left):
            caught_up_s = round(time.monotonic() - start_wait, 1)
            break
        await asyncio.sleep(1.0)
    await worker.aclose()
    rows = (await store.query("SELECT grader, toUnixTimestamp64Milli(ts) - toUnixTimestamp64Milli(inference_ts) AS lag "
                              "FROM grades FINAL")).to_pylist()
    left = {}
    for name in ("toxicity", "groundedness", "judge"):
        left[name] = len(await worker.ungraded(name, since_ms=0, until_ms=now_ms(), limit=1_000_000))
    await store.aclose()
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["grader"], []).append(r["lag"] / 1000)
    return {"rate_req_per_s": rate, "duration_s": duration_s, "inferences": written,
            "interval_s": settings.interval_s,
            "sample_rates": {n: g.sample_rate for n, g in settings.graders.items()},
            "grades": {n: len(v) for n, v in by.items()},
            "lag_s": {n: {"p50": round(pct(v, 50), 2), "p95": round(pct(v, 95), 2), "max": round(max(v), 2)}
                      for n, v in by.items()},
            "left_ungraded_after_run": left, "caught_up_after_last_write_s": caught_up_s,
            "cycles": worker.cycles,
            "last_cycle_s": worker.last_report.elapsed_s if worker.last_report else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--duration", type=float, default=90.0)
    args = ap.parse_args()
    from feedback.graders.evaluation import evaluate_all
    from feedback.monitors.embeddings import PromptEmbedder

    embedder = PromptEmbedder()
    embedder.load()
    accuracy = evaluate_all(embedder)
    figures = {"accuracy": accuracy, "throughput": throughput(128 if args.quick else 512),
               "lag": asyncio.run(lag(args.rate, 20.0 if args.quick else args.duration))}
    print(write_result("graders", figures))
    import json

    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
