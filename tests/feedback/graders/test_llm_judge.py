"""The LLM judge over a real OpenAI-compatible HTTP server (tests/support/openai_upstream.py) that answers
what each test sets: rubric scores parsed or refused, and a judge stuck on one position caught by asking both orders."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from feedback.graders.judge import judge_pair
from feedback.graders.llm_judge import ChatClient, LLMJudge, LLMPairJudge, parse_choice, parse_score
from schemas.events import InferenceEvent, Message
from tests.support.openai_upstream import RunningUpstream, UpstreamBehaviour


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    u = await RunningUpstream(UpstreamBehaviour(reply="4")).start()
    yield u
    await u.stop()


def rag_answer() -> InferenceEvent:
    return InferenceEvent(tenant="acme", model="chat", model_version="v2", response="It is 330 metres tall.",
                          messages=(Message("system", "The Eiffel Tower is 330 metres tall."),
                                    Message("user", "How tall is the Eiffel Tower?")))


async def test_rubric_scores_from_the_engine_become_one_grade_with_every_criterion(upstream: RunningUpstream) -> None:
    client = ChatClient(upstream.url, model="judge")
    judge = LLMJudge(client)
    [g] = await judge.grade([rag_answer()])
    await client.aclose()
    assert (g.grader, g.score, g.label) == ("llm_judge", 0.75, "pass")
    assert json.loads(g.explanation) == {"factuality": 0.75, "coherence": 0.75, "tone": 0.75, "helpfulness": 0.75}
    assert upstream.behaviour.requests == 4  # one per criterion
    body = upstream.behaviour.last_body
    assert body["temperature"] == 0 and body["model"] == "judge"
    assert "Reference context: The Eiffel Tower is 330 metres tall." in body["messages"][0]["content"]


async def test_a_reply_without_a_score_makes_no_grade(upstream: RunningUpstream) -> None:
    upstream.behaviour.reply = "I would rather not say."
    client = ChatClient(upstream.url, model="judge")
    judge = LLMJudge(client, criteria=("tone",))
    assert await judge.grade([rag_answer()]) == []
    await client.aclose()
    assert judge.unparsed == 1


async def test_an_engine_that_always_picks_the_first_answer_yields_ties_not_wins(upstream: RunningUpstream) -> None:
    upstream.behaviour.reply = "A"
    client = ChatClient(upstream.url, model="judge")
    pj = LLMPairJudge(client)
    v1 = await judge_pair(pj, "Capital of France?", "Sure! Paris.", "Ugh. Paris. Look it up.")
    v2 = await judge_pair(pj, "Capital of France?", "Ugh. Paris. Look it up.", "Sure! Paris.")
    upstream.behaviour.reply = "tie"
    v3 = await judge_pair(pj, "Capital of France?", "Paris.", "Paris!")
    await client.aclose()
    assert (v1.forward, v1.backward, v1.winner, v1.consistent) == ("first", "first", "tie", False)
    assert (v2.winner, v2.consistent) == ("tie", False)
    assert (v3.winner, v3.consistent) == ("tie", True)
    assert upstream.behaviour.requests == 6  # two orders per pair


def test_judge_replies_are_parsed_strictly() -> None:
    assert [parse_score(r) for r in ("4", "Score: 5.", "10", "none", "0 or 6")] == [4, 5, None, None, None]
    assert [parse_choice(r) for r in ("A", "b.", " Tie", "Answer A", "both")] == ["first", "second", "tie", None, None]
