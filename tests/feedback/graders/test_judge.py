"""The rule-based judge on the tiny model's answer styles, and pairwise judging with position-bias control."""

from __future__ import annotations

import json

from feedback.graders.judge import (
    PairOutcome,
    PairwiseGrader,
    RuleJudge,
    RulePairJudge,
    judge_pair,
    load_rubric,
    score_answer,
)
from schemas.events import InferenceEvent, Message

Q = "What is the capital of France?"
POLITE = "Sure! The capital of France is Paris. Hope that helps!"
CURT = "Ugh. The capital of France is Paris. Look it up yourself next time."
OFF_TOPIC = "By the way, did you know that octopuses have three hearts? I think socks should come in sets of three."
RAMBLING = ("Well, that is a really interesting question, and honestly I have been thinking about questions like this "
            "for a very long time. My aunt used to talk about this kind of thing at every single family dinner. "
            "There are so many little details that people tend to forget about. Anyway, to answer you: the capital "
            "of France is Paris. I could honestly talk about this all day if you let me.")


def chat(answer: str, version: str = "v1", question: str = Q) -> InferenceEvent:
    return InferenceEvent(tenant="acme", model="chat", model_version=version, response=answer,
                          messages=(Message("user", question),))


def test_the_polite_concise_on_topic_answer_passes_and_each_flaw_costs_its_criterion() -> None:
    rubric = load_rubric()
    polite, curt, off, ramble = (score_answer(Q, a, rubric) for a in (POLITE, CURT, OFF_TOPIC, RAMBLING))
    assert (polite.style, polite.overall) == ("concise_polite", 1.0)
    assert (curt.style, curt.politeness, curt.on_topic) == ("curt", 0.0, 1.0)
    assert (off.style, off.on_topic, off.politeness) == ("off_topic", 0.0, 1.0)
    assert ramble.style == "rambling" and ramble.concision < 0.5 and ramble.politeness == 1.0
    assert polite.overall > max(ramble.overall, curt.overall, off.overall)


def test_rudeness_without_a_style_opener_still_fails_politeness() -> None:
    s = score_answer(Q, "Paris. Figure it out yourself.", load_rubric())
    assert s.style == "other" and s.politeness == 0.0


async def test_pointwise_grades_pass_polite_answers_and_fail_the_others() -> None:
    judge = RuleJudge()
    infs = [chat(a) for a in (POLITE, CURT, OFF_TOPIC, RAMBLING)]
    grades = await judge.grade(infs)
    assert [g.label for g in grades] == ["pass", "fail", "fail", "fail"]
    assert json.loads(grades[1].explanation)["politeness"] == 0.0
    assert all(g.grader == "judge" and g.grader_version == judge.version for g in grades)


class FirstPositionJudge:
    """A judge with pure position bias: whatever is shown first wins (what LLM judges drift towards)."""

    name, version = "biased", "1"

    async def compare(self, question: str, first: str, second: str) -> PairOutcome:
        return "first"


class LengthBiasedFirst:
    """Prefers the polite answer, but when it is shown second only ties (a partial position bias)."""

    name, version = "partial", "1"

    async def compare(self, question: str, first: str, second: str) -> PairOutcome:
        if first.startswith("Sure!"):
            return "first"
        return "tie"


async def test_judging_both_orders_turns_a_pure_position_bias_into_ties() -> None:
    for a, b in ((POLITE, CURT), (CURT, POLITE)):
        v = await judge_pair(FirstPositionJudge(), Q, a, b)
        assert (v.winner, v.consistent, v.score_a) == ("tie", False, 0.5)


async def test_an_order_dependent_verdict_is_a_tie_and_an_order_free_one_stands() -> None:
    partial = await judge_pair(LengthBiasedFirst(), Q, POLITE, CURT)
    assert (partial.forward, partial.backward, partial.winner) == ("first", "tie", "tie")
    rules = RulePairJudge()
    ab, ba = await judge_pair(rules, Q, POLITE, CURT), await judge_pair(rules, Q, CURT, POLITE)
    assert (ab.winner, ab.consistent) == ("a", True)
    assert (ba.winner, ba.consistent) == ("b", True)
    assert (await judge_pair(rules, Q, POLITE, POLITE)).winner == "tie"


async def test_pairwise_grades_name_both_inferences_and_versions() -> None:
    a, b = chat(CURT, "v1"), chat(POLITE, "v2")
    [g] = await PairwiseGrader().grade_pairs([(a, b)])
    assert (g.target_id, g.other_id, g.model_version, g.other_version) == (a.event_id, b.event_id, "v1", "v2")
    assert (g.label, g.score, g.grader) == ("loss", 0.0, "judge_pairwise")
    assert json.loads(g.explanation) == {"forward": "second", "backward": "first", "consistent": True}
