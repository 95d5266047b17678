"""Self-consistency over a real OpenAI-compatible HTTP server and the real embedder: samples that agree with
the served answer make it consistent, samples that say something else make it inconsistent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from feedback.graders.consistency import SelfConsistencyGrader
from feedback.graders.llm_judge import ChatClient
from feedback.monitors.embeddings import PromptEmbedder
from schemas.events import InferenceEvent, Message
from tests.support.openai_upstream import RunningUpstream, UpstreamBehaviour

ANSWER = "The Great Wall of China is about 21,000 kilometres long."


@pytest.fixture
async def engine() -> AsyncIterator[RunningUpstream]:
    u = await RunningUpstream(UpstreamBehaviour(reply="The Great Wall of China stretches roughly 21,000 km.")).start()
    yield u
    await u.stop()


def asked(response: str = ANSWER, context: str = "") -> InferenceEvent:
    messages = ((Message("system", context),) if context else ()) + (Message("user", "How long is the Great Wall?"),)
    return InferenceEvent(tenant="acme", model="chat", model_version="v1", response=response, messages=messages)


async def test_samples_that_agree_make_the_answer_consistent_and_samples_that_differ_do_not(
        engine: RunningUpstream, embedder: PromptEmbedder) -> None:
    client = ChatClient(engine.url, model="chat")
    grader = SelfConsistencyGrader(client, embedder, samples=3)
    [agree] = await grader.grade([asked()])
    assert engine.behaviour.requests == 3 and engine.behaviour.last_body["temperature"] == 0.8
    engine.behaviour.reply = "Bananas are a good source of potassium and grow in the tropics."
    [differ] = await grader.grade([asked()])
    await client.aclose()
    assert (agree.label, differ.label) == ("consistent", "inconsistent")
    assert agree.score < 0.4 < differ.score
    assert len(json.loads(differ.explanation)["similarities"]) == 3


async def test_requests_with_context_are_left_to_groundedness_and_a_dead_engine_costs_only_the_grade(
        embedder: PromptEmbedder) -> None:
    client = ChatClient("http://127.0.0.1:9/v1", model="chat", timeout_s=2)
    grader = SelfConsistencyGrader(client, embedder)
    assert await grader.grade([asked(context="The wall is long.")]) == []
    assert await grader.grade([asked()]) == []
    await client.aclose()
    assert grader.failed == 1
