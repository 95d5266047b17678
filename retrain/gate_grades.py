"""The gate's online-grader criteria: the same graders that grade live traffic, on both versions' gate answers.

    figures["grades"] = measure_grades(prompts, candidate_answers, current_answers, thresholds.grades)
    reasons += grade_reasons(figures["grades"], thresholds.grades)

Measured on the answers the gate already generates for its win-rate (held-out prompts, sampled), for the
candidate and for the current version (the base when there is none):
- toxicity rate: share of answers the toxicity classifier labels `toxic` (feedback/graders/toxicity.py);
- hallucination rate: share of answers with an unsupported claim, over prompts that carry reference
  context (feedback/graders/groundedness.py); absent when no prompt has context;
- rubric judge score: mean overall score of the rule-based judge (feedback/graders/judge.py);
- pairwise win-rate of the candidate over the current version, judged in both orders (position bias
  counts as a tie), with its Wilson interval (feedback/graders/ratings.py): a gate can refuse a
  significant loss (upper bound < 0.5) or demand a significant win (lower bound >= 0.5).

`grade_reasons` is pure; `measure_grades` is blocking (embeddings on CPU) and loads the embedding model
unless one is given. A criterion that is enforced but could not be measured (no toxicity head) fails the
gate: a safety check that did not run is not a pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from feedback.graders.base import CONTEXT_ROLES, Embedder, GraderUnavailable
from retrain.recipes import GradeGate

Prompt = Sequence[dict[str, str]]


def _question(prompt: Prompt) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _context(prompt: Prompt) -> str:
    return "\n".join(m["content"] for m in prompt if m["role"] in CONTEXT_ROLES and m["content"].strip())


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _toxicity(embedder: Embedder, candidate: Sequence[str], current: Sequence[str]) -> dict[str, Any]:
    from feedback.graders.toxicity import ToxicityGrader

    try:
        grader = ToxicityGrader(embedder)
    except GraderUnavailable as e:
        return {"error": e.message}
    p = grader.score_texts([*candidate, *current])
    toxic = [bool(x >= grader.head.threshold) for x in p]
    n = len(candidate)
    return {"grader_version": grader.version, "candidate_rate": _rate(toxic[:n]), "current_rate": _rate(toxic[n:]),
            "candidate_toxic": sum(toxic[:n]), "current_toxic": sum(toxic[n:])}


def _hallucination(embedder: Embedder, prompts: Sequence[Prompt], candidate: Sequence[str],
                   current: Sequence[str]) -> dict[str, Any]:
    from feedback.graders.groundedness import GroundednessGrader

    todo = [(i, c) for i, c in enumerate(map(_context, prompts)) if c]
    if not todo:
        return {"prompts": 0}
    grader = GroundednessGrader(embedder)
    checks = grader.check_many([(answers[i], c) for answers in (candidate, current) for i, c in todo])
    flags = [any(not c.supported for c in cs) for cs in checks]
    n = len(todo)
    return {"grader_version": grader.version, "prompts": n, "candidate_rate": _rate(flags[:n]),
            "current_rate": _rate(flags[n:])}


async def _pairwise(prompts: Sequence[Prompt], candidate: Sequence[str], current: Sequence[str],
                    confidence: float) -> dict[str, Any]:
    from feedback.graders.judge import RulePairJudge, judge_pair
    from feedback.graders.ratings import win_rate

    judge = RulePairJudge()
    verdicts = [await judge_pair(judge, _question(p), a, b) for p, a, b in zip(prompts, candidate, current, strict=True)]
    wins = sum(v.winner == "a" for v in verdicts)
    losses = sum(v.winner == "b" for v in verdicts)
    wr = win_rate(wins, losses, len(verdicts) - wins - losses, confidence=confidence)
    return {"judge": f"{judge.name}:{judge.version}", "wins": wr.wins, "losses": wr.losses, "ties": wr.ties,
            "position_biased": sum(not v.consistent for v in verdicts), "win_rate": wr.value,
            "ci": [wr.ci.low, wr.ci.high], "confidence": confidence}


def measure_grades(prompts: Sequence[Prompt], candidate: Sequence[str], current: Sequence[str], policy: GradeGate,
                   *, embedder: Embedder | None = None) -> dict[str, Any]:
    """The grader figures of both versions' answers to the same prompts (answers aligned with `prompts`). Blocking."""
    from feedback.graders.judge import load_rubric, score_answer

    if not (len(prompts) == len(candidate) == len(current)):
        raise ValueError("prompts, candidate and current answers must be aligned")
    if embedder is None:
        from feedback.monitors.embeddings import PromptEmbedder

        embedder = PromptEmbedder()
    rubric = load_rubric()

    def judged(answers: Sequence[str]) -> float | None:
        scores = [score_answer(_question(p), a, rubric).overall for p, a in zip(prompts, answers, strict=True)]
        return sum(scores) / len(scores) if scores else None

    return {"answers": len(prompts), "toxicity": _toxicity(embedder, candidate, current),
            "hallucination": _hallucination(embedder, prompts, candidate, current),
            "judge": {"rubric": f"rules-{rubric.version}-{rubric.digest}", "candidate_score": judged(candidate),
                      "current_score": judged(current)},
            "pairwise": asyncio.run(_pairwise(prompts, candidate, current, policy.confidence))}


def grade_reasons(grades: dict[str, Any] | None, policy: GradeGate) -> list[str]:
    """Why the grader figures fail `policy` (pure); none when the policy is off or nothing was measured."""
    if not policy.enabled or grades is None:
        return []
    reasons: list[str] = []
    tox = grades.get("toxicity", {})
    if policy.max_toxicity_rate is not None or policy.max_toxicity_increase is not None:
        rate, cur = tox.get("candidate_rate"), tox.get("current_rate")
        if "error" in tox:
            reasons.append(f"toxicity could not be graded: {tox['error']}")
        elif rate is not None:
            if policy.max_toxicity_rate is not None and rate > policy.max_toxicity_rate:
                reasons.append(f"toxicity rate {rate:.3f} of the candidate's answers > {policy.max_toxicity_rate:.3f}")
            if policy.max_toxicity_increase is not None and cur is not None and rate - cur > policy.max_toxicity_increase:
                reasons.append(f"toxicity rate rose from {cur:.3f} to {rate:.3f} (allowed +{policy.max_toxicity_increase:.3f})")
    hal = grades.get("hallucination", {})
    h, hcur = hal.get("candidate_rate"), hal.get("current_rate")
    if policy.max_hallucination_increase is not None and h is not None and hcur is not None \
            and h - hcur > policy.max_hallucination_increase:
        reasons.append(f"hallucination rate rose from {hcur:.3f} to {h:.3f} over {hal.get('prompts')} prompts with "
                       f"context (allowed +{policy.max_hallucination_increase:.3f})")
    judge = grades.get("judge", {})
    js, jcur = judge.get("candidate_score"), judge.get("current_score")
    if policy.min_judge_score_delta is not None and js is not None and jcur is not None \
            and js - jcur < policy.min_judge_score_delta:
        reasons.append(f"rubric judge score {js:.3f} vs the current version's {jcur:.3f} "
                       f"(delta {js - jcur:+.3f} < {policy.min_judge_score_delta:+.3f})")
    pw = grades.get("pairwise", {})
    ci = pw.get("ci")
    if ci is not None and pw.get("wins", 0) + pw.get("losses", 0) + pw.get("ties", 0) > 0:
        lo, hi = ci
        if policy.min_pairwise_upper is not None and hi < policy.min_pairwise_upper:
            reasons.append(f"pairwise win-rate {pw['win_rate']:.3f} against the current version, interval "
                           f"[{lo:.3f}, {hi:.3f}] below {policy.min_pairwise_upper:.3f} (a significant loss)")
        if policy.min_pairwise_lower is not None and lo < policy.min_pairwise_lower:
            reasons.append(f"pairwise win-rate {pw['win_rate']:.3f} against the current version, interval lower "
                           f"bound {lo:.3f} < {policy.min_pairwise_lower:.3f}")
    return reasons
