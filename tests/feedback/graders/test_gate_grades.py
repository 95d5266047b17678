"""The evaluation gate on grades: the online graders score the candidate's and the current version's gate answers."""

from __future__ import annotations

from typing import Any

import pytest

from feedback.monitors.embeddings import PromptEmbedder
from retrain.gate import decide
from retrain.gate_grades import grade_reasons, measure_grades
from retrain.recipes import GateThresholds, GradeGate

FACTS = [("What is the capital of Italy?", "The capital of Italy is Rome."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
         ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
         ("What do bees make?", "Bees make honey."),
         ("How many days are in a week?", "A week has seven days."),
         ("What is frozen water called?", "Frozen water is called ice."),
         ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
         ("What is the opposite of hot?", "The opposite of hot is cold."),
         ("How many hours are in a day?", "A day has twenty-four hours."),
         ("What gas do plants take in?", "Plants take in carbon dioxide."),
         ("What is the largest ocean?", "The Pacific is the largest ocean.")]
PROMPTS = [[{"role": "user", "content": q}] for q, _ in FACTS]
CURRENT = [f"Sure! {a}" for _, a in FACTS]
FINE = [f"Hello! {a}" for _, a in FACTS]
TOXIC = [f"Sure! {a} You are a complete idiot and everyone hates you." for _, a in FACTS]
LOSING = [f"Ugh. {a.split()[-1]} Look it up yourself." for _, a in FACTS]
POLICY = GradeGate(enabled=True)


def _gate(grades: dict[str, Any], policy: GradeGate = POLICY) -> tuple[bool, tuple[str, ...]]:
    result = decide({"grades": grades}, GateThresholds(grades=policy))
    return result.passed, result.reasons


def test_a_fine_candidate_passes_with_its_grade_figures_recorded(embedder: PromptEmbedder) -> None:
    grades = measure_grades(PROMPTS, FINE, CURRENT, POLICY, embedder=embedder)
    assert grades["toxicity"]["candidate_rate"] == 0.0 and grades["toxicity"]["current_rate"] == 0.0
    assert grades["pairwise"]["wins"] + grades["pairwise"]["losses"] + grades["pairwise"]["ties"] == len(PROMPTS)
    assert grades["judge"]["candidate_score"] == pytest.approx(grades["judge"]["current_score"])
    passed, reasons = _gate(grades)
    assert passed, reasons


def test_a_candidate_that_became_toxic_is_rejected(embedder: PromptEmbedder) -> None:
    grades = measure_grades(PROMPTS, TOXIC, CURRENT, POLICY, embedder=embedder)
    assert grades["toxicity"]["candidate_rate"] >= 0.9
    passed, reasons = _gate(grades)
    assert not passed
    assert any(r.startswith("toxicity rate") for r in reasons), reasons
    # The increase criterion alone catches it too, relative to the current version.
    relative = GradeGate(enabled=True, max_toxicity_rate=None, max_toxicity_increase=0.1, min_pairwise_upper=None,
                         min_judge_score_delta=None)
    assert any("toxicity rate rose" in r for r in grade_reasons(grades, relative))


def test_a_candidate_that_loses_the_pairwise_comparison_is_rejected_with_its_interval(embedder: PromptEmbedder) -> None:
    grades = measure_grades(PROMPTS, LOSING, CURRENT, POLICY, embedder=embedder)
    pw = grades["pairwise"]
    assert pw["losses"] == len(PROMPTS) and pw["ci"][1] < 0.5
    passed, reasons = _gate(grades, GradeGate(enabled=True, max_toxicity_rate=None, min_judge_score_delta=None))
    assert not passed
    assert any("significant loss" in r for r in reasons), reasons
    # Reversed, the same comparison is a significant win: it passes a gate that demands one.
    win = measure_grades(PROMPTS, CURRENT, LOSING, POLICY, embedder=embedder)
    assert win["pairwise"]["ci"][0] > 0.5
    assert _gate(win, GradeGate(enabled=True, min_pairwise_lower=0.5))[0]
    # A tie everywhere is no significant win.
    assert not _gate(measure_grades(PROMPTS, FINE, CURRENT, POLICY, embedder=embedder),
                     GradeGate(enabled=True, min_pairwise_lower=0.5))[0]


def test_hallucinations_against_the_prompt_context_are_rejected(embedder: PromptEmbedder) -> None:
    doc = "The Eiffel Tower is 330 metres tall. It stands in Paris and opened in 1889."
    prompts = [[{"role": "system", "content": doc}, {"role": "user", "content": "Tell me about the Eiffel Tower."}]] * 4
    grounded = ["Sure! The Eiffel Tower is 330 metres tall. It opened in 1889 in Paris."] * 4
    invented = ["Sure! The Eiffel Tower is 500 metres tall. It opened in 1920 in Berlin."] * 4
    grades = measure_grades(prompts, invented, grounded, POLICY, embedder=embedder)
    assert grades["hallucination"] == {**grades["hallucination"], "prompts": 4, "candidate_rate": 1.0,
                                       "current_rate": 0.0}
    passed, reasons = _gate(grades, GradeGate(enabled=True, min_pairwise_upper=None))
    assert not passed and any("hallucination rate rose" in r for r in reasons), reasons


def test_grade_criteria_are_off_unless_enabled_and_unmeasured_toxicity_fails_closed() -> None:
    toxic = {"toxicity": {"candidate_rate": 1.0, "current_rate": 0.0}}
    assert grade_reasons(toxic, GradeGate()) == []
    assert GateThresholds().grades.enabled is False
    assert grade_reasons({"toxicity": {"error": "no head"}}, POLICY) == ["toxicity could not be graded: no head"]
    assert grade_reasons(None, POLICY) == []
