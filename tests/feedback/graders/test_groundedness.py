"""The groundedness grader: answer claims against the request's reference context, with the real embedder."""

from __future__ import annotations

import json

import pytest

from feedback.graders.groundedness import GroundednessGrader, claims_of
from feedback.monitors.embeddings import PromptEmbedder
from schemas.events import InferenceEvent, Message

CONTEXT = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is 330 metres tall and was "
           "designed by the engineering company of Gustave Eiffel. It was the tallest man-made structure in the "
           "world until 1930.")
QUESTION = "When was the Eiffel Tower built and how tall is it?"


def rag(answer: str, context: str = CONTEXT, role: str = "system") -> InferenceEvent:
    return InferenceEvent(tenant="acme", model="chat", model_version="v1", response=answer,
                          messages=(Message(role, context), Message("user", QUESTION)))


@pytest.fixture(scope="module")
def grader(embedder: PromptEmbedder) -> GroundednessGrader:
    return GroundednessGrader(embedder)


@pytest.mark.parametrize("answer", [
    "Sure! The Eiffel Tower was finished in 1889 for the World's Fair. It is 330 metres tall.",
    "It was designed by Gustave Eiffel's engineering company and stayed the tallest structure until 1930.",
], ids=["paraphrase", "two-facts"])
async def test_an_answer_the_context_supports_is_grounded(grader: GroundednessGrader, answer: str) -> None:
    [g] = await grader.grade([rag(answer)])
    assert (g.label, g.score) == ("grounded", 0.0), g.explanation


@pytest.mark.parametrize(("answer", "share"), [
    ("The Eiffel Tower was completed in 1925 in Lyon.", 1.0),  # same topic, wrong date and place
    ("The Eiffel Tower was completed in 1889. It was designed by Thomas Edison.", 0.5),
    ("Bananas are rich in potassium and grow in tropical climates.", 1.0),  # nothing to do with the context
    ("The tower is painted bright green every summer by volunteers.", 1.0),  # plausible, unsupported
], ids=["wrong-facts", "one-of-two", "unrelated", "invented-detail"])
async def test_unsupported_claims_are_hallucinations_scored_by_their_share(grader: GroundednessGrader, answer: str,
                                                                          share: float) -> None:
    [g] = await grader.grade([rag(answer)])
    assert g.label == "hallucinated"
    assert g.score == pytest.approx(share)
    assert json.loads(g.explanation)["unsupported"] >= 1


async def test_context_in_a_document_message_counts_and_requests_without_context_get_no_grade(
        grader: GroundednessGrader) -> None:
    no_context = InferenceEvent(response="The tower is 330 metres tall.", messages=(Message("user", QUESTION),))
    doc = rag("The tower is 330 metres tall.", role="document")
    grades = await grader.grade([no_context, doc])
    assert [g.target_id for g in grades] == [doc.event_id]  # without context: the self-consistency grader's
    assert grades[0].label == "grounded"


def test_pleasantries_are_not_claims() -> None:
    assert claims_of("Sure! Hope that helps! Happy to help.") == []
    assert claims_of("Sure! The tower is 330 metres tall. Hope that helps!") == ["The tower is 330 metres tall."]
