"""The one internal request both front ends translate onto, and the chunks the core yields back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

Operation = Literal["chat", "text_completion"]
FinishReason = Literal["stop", "length", "content_filter", "cancelled"]
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class InferenceRequest:
    """A validated request: the front ends build it, the core serves it, engines read it."""

    model: str
    operation: Operation
    params: SamplingParams
    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""
    stream: bool = False
    use_cache: bool = False
    user: str = ""
    session: str = ""  # the caller's session id (x-servoloop-session): keeps it on one canary arm
    request_id: str = ""
    traceparent: str = ""
    trace_id: str = ""  # 32 hex digits when tracing assigned one (from `traceparent` or new)
    span_id: str = ""  # 16 hex digits: this request's server span
    deadline: float | None = None  # time.monotonic() by which the answer must be complete
    received_at: float = field(default_factory=time.monotonic)

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated text; the last chunk of a stream has `finish_reason` and `usage` set."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished answer, as the core returns it to a unary call."""

    id: str
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    created: int
    cached: bool = False
    model_version: str = ""
