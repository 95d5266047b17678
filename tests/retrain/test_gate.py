"""The evaluation gate's decision rule over measured figures, its judge, and the accuracy it computes.
(The gate measured on real trained adapters: tests/retrain/test_train.py.)"""

from __future__ import annotations

import math

import pytest

from retrain.gate import StyleJudge, decide, general_texts, make_judge, preference_accuracy
from retrain.recipes import GateThresholds, load_recipe

GOOD = {"preference_accuracy": 0.97, "current_preference_accuracy": 0.5, "win_rate": 0.8, "judge": "style",
        "safety_findings": 1, "current_safety_findings": 1, "perplexity_ratio": 1.05}


def test_a_candidate_better_on_every_figure_passes() -> None:
    result = decide(GOOD, GateThresholds())
    assert result.passed and result.reasons == ()
    assert result.as_dict()["passed"] is True and result.as_dict()["win_rate"] == 0.8


@pytest.mark.parametrize(("change", "reason"), [
    ({"preference_accuracy": 0.85}, "held-out preference accuracy 0.850 < 0.900"),
    ({"current_preference_accuracy": 0.93}, "preference accuracy gain +0.040"),
    ({"win_rate": 0.4}, "win-rate 0.400"),
    ({"safety_findings": 3}, "red-team findings rose from 1 to 3"),
    ({"perplexity_ratio": 1.6}, "perplexity grew 1.600x"),
])
def test_each_failing_figure_is_named_in_the_reasons(change: dict, reason: str) -> None:
    result = decide({**GOOD, **change}, GateThresholds())
    assert not result.passed
    assert len(result.reasons) == 1 and reason in result.reasons[0]


def test_every_failure_is_reported_not_just_the_first() -> None:
    bad = {**GOOD, "preference_accuracy": 0.2, "win_rate": 0.1, "perplexity_ratio": 3.0}
    assert len(decide(bad, GateThresholds()).reasons) == 4  # accuracy, gain, win-rate, perplexity


def test_thresholds_come_from_the_recipe() -> None:
    lenient = GateThresholds(min_preference_accuracy=0.8, min_win_rate=0.3, max_safety_regression=5,
                             max_perplexity_ratio=2.0)
    assert decide({**GOOD, "preference_accuracy": 0.85, "win_rate": 0.4, "safety_findings": 4,
                   "perplexity_ratio": 1.6}, lenient).passed
    assert load_recipe("dpo").gate.min_preference_accuracy == 0.9


def test_figures_not_measured_are_not_checked() -> None:
    assert decide({"win_rate": 0.9}, GateThresholds()).passed


def test_preference_accuracy_counts_ties_as_half() -> None:
    assert preference_accuracy([1.0, -1.0, 0.0, 2.0]) == pytest.approx(0.625)
    assert preference_accuracy([0.0] * 5) == 0.5  # the base against itself
    assert math.isnan(preference_accuracy([]))


def test_the_style_judge_prefers_the_target_style() -> None:
    judge = make_judge(GateThresholds(target_style="concise_polite"))
    assert isinstance(judge, StyleJudge)
    assert judge.score([], "Sure! Paris is the capital.") == 1.0
    assert judge.score([], "Ugh. Paris. Obviously.") == 0.0
    assert StyleJudge("curt").score([], "Ugh. Paris.") == 1.0


def test_the_general_set_is_fixed_and_unseen() -> None:
    assert general_texts(8) == general_texts(8) and len(general_texts(8)) == 8
