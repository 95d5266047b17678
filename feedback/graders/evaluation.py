"""Each grader measured on its bundled labelled set (`servoloop grade eval`, benchmarks/graders.py).

    toxicity      data/toxicity.jsonl, `heldout` split (whole templates never trained on): precision/recall
    groundedness  data/groundedness.jsonl (hand-written context, answer, grounded|hallucinated): accuracy, P/R
    judge         data/judge.jsonl (hand-written question, answer, pass|fail): accuracy; and over every
                  pair of answers to one question, the share judged the same way in both orders

Throughput is texts (answers, pairs) per second of this process, model already loaded; run it alone
on an idle machine for figures worth recording.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from feedback.graders.base import Embedder
from feedback.graders.groundedness import GroundednessGrader
from feedback.graders.judge import RulePairJudge, judge_pair, load_rubric, score_answer
from feedback.graders.toxicity import ToxicityGrader, load_head, precision_recall, wordlist_predict
from feedback.graders.toxicity_set import DATA_DIR, load_set

GROUNDEDNESS_SET = DATA_DIR / "groundedness.jsonl"
JUDGE_SET = DATA_DIR / "judge.jsonl"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_toxicity(embedder: Embedder) -> dict[str, Any]:
    rows = [r for r in load_set() if r["split"] == "heldout"]
    texts = [str(r["text"]) for r in rows]
    labels = np.array([r["label"] for r in rows])
    grader = ToxicityGrader(embedder, load_head())
    started = time.perf_counter()
    p = grader.score_texts(texts)
    elapsed = time.perf_counter() - started
    return {"heldout": precision_recall(p >= grader.head.threshold, labels),
            "wordlist_baseline": precision_recall(wordlist_predict(texts), labels),
            "texts_per_s": len(texts) / elapsed, "version": grader.version}


def eval_groundedness(embedder: Embedder, *, similarity: float = 0.6) -> dict[str, Any]:
    rows = _jsonl(GROUNDEDNESS_SET)
    grader = GroundednessGrader(embedder, similarity=similarity)
    started = time.perf_counter()
    predicted = np.array([not all(c.supported for c in grader.check(r["answer"], r["context"])) for r in rows])
    elapsed = time.perf_counter() - started
    labels = np.array([r["label"] == "hallucinated" for r in rows])
    return {"set": precision_recall(predicted, labels), "answers_per_s": len(rows) / elapsed,
            "similarity": similarity}


def eval_judge() -> dict[str, Any]:
    rows = _jsonl(JUDGE_SET)
    rubric = load_rubric()
    started = time.perf_counter()
    passed = np.array([score_answer(r["question"], r["answer"], rubric).overall >= rubric.pass_at for r in rows])
    elapsed = time.perf_counter() - started
    labels = np.array([r["label"] == "pass" for r in rows])
    pairs = [(a, b) for _, group in itertools.groupby(rows, key=lambda r: r["question"])
             for a, b in itertools.combinations(list(group), 2)]
    judge = RulePairJudge(rubric)

    async def verdicts() -> list[Any]:
        return [await judge_pair(judge, a["question"], a["answer"], b["answer"]) for a, b in pairs]

    vs = asyncio.run(verdicts())
    decided = [(v, a, b) for v, (a, b) in zip(vs, pairs, strict=True) if a["label"] != b["label"]]
    right = sum((v.winner == "a") == (a["label"] == "pass") for v, a, _ in decided if v.winner != "tie")
    return {"set": precision_recall(~passed, ~labels) | {"accuracy": float((passed == labels).mean())},
            "answers_per_s": len(rows) / elapsed if elapsed else float("inf"),
            "pairs": len(pairs), "pairs_consistent_both_orders": sum(v.consistent for v in vs) / max(1, len(vs)),
            "pairs_with_a_better_answer": len(decided),
            "pairwise_accuracy": right / max(1, len(decided))}


def evaluate_all(embedder: Embedder) -> dict[str, Any]:
    """Every grader on its set (blocking: embeds a few hundred texts)."""
    return {"toxicity": eval_toxicity(embedder), "groundedness": eval_groundedness(embedder), "judge": eval_judge()}
