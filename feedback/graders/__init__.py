"""Online graders: automatic grades of sampled live traffic (toxicity, groundedness, rubric judge, pairwise).

    worker = GradingWorker(store, publish, settings.grading)   # samples stored inferences, grades, publishes
    await worker.start(); ...; await worker.aclose()

Grades are `GradeEvent`s (schemas/events.py) on the `grades` topic and table; the `grade` monitor kind
(feedback/monitors/grades.py) turns them into monitor metrics. Names are imported on first use, so
importing the settings does not load numpy models.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Grader": "base", "GraderUnavailable": "base", "context_of": "base", "question_of": "base",
    "ToxicityGrader": "toxicity", "ToxicityHead": "toxicity", "load_head": "toxicity", "train_head": "toxicity",
    "GroundednessGrader": "groundedness",
    "RuleJudge": "judge", "RulePairJudge": "judge", "PairwiseGrader": "judge", "judge_pair": "judge",
    "score_answer": "judge", "load_rubric": "judge",
    "win_rate": "ratings", "win_rates": "ratings", "elo_ratings": "ratings", "online_elo": "ratings",
    "GradingWorker": "worker", "GradingSettings": "settings", "GraderSettings": "settings",
    "LLMJudge": "llm_judge", "LLMPairJudge": "llm_judge", "ChatClient": "llm_judge",
    "SelfConsistencyGrader": "consistency", "ShadowComparer": "shadow",
    "OtelGradeExporter": "export", "LangfuseGradeScores": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"feedback.graders.{_EXPORTS[name]}"), name)
