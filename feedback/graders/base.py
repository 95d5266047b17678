"""The `Grader` seam, and what every grader reads from an inference: its answer, its question, its context.

A grader turns a batch of served inferences into `GradeEvent`s, off the request path (the grading
worker, feedback/graders/worker.py, samples stored inferences and publishes the grades through the
event sink, so they travel Kafka -> ClickHouse like every event). Graders are pure apart from their
model: no store, no network, unless a grader says so (an LLM judge over a remote engine).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from schemas.errors import ServoloopError
from schemas.events import GradeEvent, InferenceEvent

# Roles whose messages are reference material rather than conversation (RAG documents, tool output).
CONTEXT_ROLES = frozenset({"system", "context", "document", "tool"})
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


class GraderUnavailable(ServoloopError):
    """A grader cannot run: its bundled model or weights are missing (build them with `servoloop grade ...`)."""

    code = "grader_unavailable"


@runtime_checkable
class Grader(Protocol):
    """Grades inferences. `name` and `version` are written into every GradeEvent it returns.

    `grade` returns at most one GradeEvent per inference (none for an inference it cannot grade, e.g.
    groundedness without context); it never raises for odd text, only GraderUnavailable when its model
    is missing. CPU-heavy work runs off the event loop.
    """

    name: str
    version: str

    async def grade(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]: ...


class Embedder(Protocol):
    """Sentence embeddings, one L2-normalised float32 row per text (feedback/monitors/embeddings.PromptEmbedder)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (split after . ! ? and at line breaks), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def answer_of(inference: InferenceEvent) -> str:
    """The text the model returned (redacted as stored)."""
    return inference.response


def question_of(inference: InferenceEvent) -> str:
    """What the user asked: the completion prompt, or the chat's last user turn."""
    if inference.prompt:
        return inference.prompt
    for m in reversed(inference.messages):
        if m.role == "user":
            return m.content
    return ""


def context_of(inference: InferenceEvent) -> str:
    """Reference material the request carried: system/context/document/tool messages, joined; "" if none."""
    return "\n".join(m.content for m in inference.messages if m.role in CONTEXT_ROLES and m.content.strip())


def grade_of(grader: Grader, inference: InferenceEvent, *, score: float, label: str, explanation: str = "",
             **extra: object) -> GradeEvent:
    """A GradeEvent of `inference` by `grader`, carrying the inference's tenant, model and version."""
    return GradeEvent(tenant=inference.tenant, grader=grader.name, grader_version=grader.version,
                      target_id=inference.event_id, model=inference.model, model_version=inference.model_version,
                      inference_ts_ms=inference.ts_ms, score=float(score), label=label, explanation=explanation,
                      **extra)  # type: ignore[arg-type]
