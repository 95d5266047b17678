"""Guardrails on the core path: the tenant's policy over a request's input and its answer's output.

Input: block raises GuardrailBlocked (HTTP 400 / INVALID_ARGUMENT, code `guardrail_blocked`), redact
rewrites the texts the engine sees. Output: the stream guard emits only text that can no longer
become part of a match; a blocked answer ends with finish_reason `content_filter`, unary or streamed.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gateway.request import ChatMessage, Chunk, InferenceRequest
from guardrails import GuardrailBlocked, GuardrailVerdict, Policy, PolicySet

CANARY_PREFIX = "sl-canary-"


@dataclass(slots=True)
class GuardState:
    """What one request's guardrails decided, for the output side and for telemetry."""

    policy: Policy
    canary: str | None
    input: GuardrailVerdict
    output: GuardrailVerdict | None = None


def _with_canary(request: InferenceRequest, canary: str) -> InferenceRequest:
    """Append the canary to the first system message (requests without one get none)."""
    msgs = list(request.messages)
    for i, m in enumerate(msgs):
        if m.role == "system":
            msgs[i] = ChatMessage("system", f"{m.content}\n\n(reference: {canary})")
            return dataclasses.replace(request, messages=tuple(msgs))
    return request


class RequestGuard:
    def __init__(self, policies: Callable[[], PolicySet], *, plant_canary: bool = False):
        self._policies = policies
        self._plant_canary = plant_canary

    def check_input(self, tenant: str, request: InferenceRequest) -> tuple[InferenceRequest, GuardState]:
        """The request as the engine may see it (redacted), and the state for the output side.

        Raises GuardrailBlocked naming the finding types when the policy blocks the input.
        """
        policy = self._policies().resolve(tenant, request.model)
        chat = request.operation == "chat"
        t0 = time.perf_counter_ns()
        verdict = policy.check_input([m.content for m in request.messages] if chat else [request.prompt])
        summary = policy.summary(verdict, side="input", elapsed_us=(time.perf_counter_ns() - t0) // 1000)
        if verdict.blocked:
            blocked = GuardrailBlocked(verdict, side="input")
            blocked.summary = summary  # for telemetry: the rejected request still yields a GuardrailEvent
            raise blocked
        if verdict.action == "redact":
            if chat:
                msgs = tuple(ChatMessage(m.role, t) for m, t in zip(request.messages, verdict.texts, strict=True))
                request = dataclasses.replace(request, messages=msgs)
            else:
                request = dataclasses.replace(request, prompt=verdict.texts[0])
        canary = None
        if self._plant_canary and chat and any(m.role == "system" for m in request.messages):
            canary = CANARY_PREFIX + secrets.token_hex(6)
            request = _with_canary(request, canary)
        return request, GuardState(policy, canary, summary)

    @staticmethod
    def check_output(state: GuardState, final: Chunk) -> Chunk:
        """A whole answer after the output policy: redacted, or emptied with finish_reason content_filter."""
        t0 = time.perf_counter_ns()
        verdict = state.policy.check_output(final.text, system_prompt_canary=state.canary)
        state.output = state.policy.summary(verdict, side="output", elapsed_us=(time.perf_counter_ns() - t0) // 1000)
        if verdict.blocked:
            return Chunk("", "content_filter", final.usage)
        return Chunk(verdict.text, final.finish_reason, final.usage) if verdict.action == "redact" else final

    @staticmethod
    async def guard_stream(state: GuardState, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Filter a stream; equal to check_output on the whole text. Stops the engine on a block."""
        guard = state.policy.stream_guard(system_prompt_canary=state.canary)
        spent = 0
        try:
            async for chunk in chunks:
                t0 = time.perf_counter_ns()
                out = guard.feed(chunk.text) if chunk.text else ""
                if chunk.finish_reason and not guard.blocked:
                    out += guard.finish()
                spent += time.perf_counter_ns() - t0
                if guard.blocked:
                    yield Chunk(out, "content_filter", chunk.usage)
                    return  # closing `chunks` aborts the generation
                if out or chunk.finish_reason:
                    yield Chunk(out, chunk.finish_reason, chunk.usage)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            state.output = state.policy.summary(guard.verdict, side="output", elapsed_us=spent // 1000, streamed=True)
