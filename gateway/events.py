"""Telemetry emission: every finished or refused request becomes events on the event sink.

Pure functions turn an `Outcome` (or a refusal) into `InferenceEvent` and `GuardrailEvent`s; the
`EventEmitter` observer hands them to a publisher whose `publish` only enqueues (the durable sink in
`feedback/`), so the request path never waits on Kafka, ClickHouse or disk. The texts recorded are
the ones that left the guardrails: the redacted prompt the engine saw and the answer the client got.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.auth import Principal
from gateway.request import InferenceRequest
from gateway.service import Outcome
from guardrails import GuardrailBlocked, GuardrailVerdict
from schemas.errors import ServoloopError
from schemas.events import Event, GuardrailEvent, InferenceEvent, Message

log = logging.getLogger(__name__)


class EventPublisher(Protocol):
    """Where the gateway puts events: `publish` must not block (the sink queues, spools and ships).

    A publisher may also offer `publish_many(events)`, which the emitter then uses for a request's events
    (the durable sink appends them to its spool in one write).
    """

    def publish(self, event: Event) -> None: ...


def _guardrail_event(v: GuardrailVerdict, *, ts_ms: int, tenant: str, key_id: str, model: str,
                     inference_id: str) -> GuardrailEvent:
    # The verdict's dicts are never mutated after the check: shared, not copied.
    return GuardrailEvent(
        ts_ms=ts_ms, tenant=tenant, key_id=key_id, model=model, request_id=inference_id, inference_id=inference_id,
        side=v.side, action=v.action, finding_counts=v.finding_counts, detectors=v.detectors,  # type: ignore[arg-type]
        elapsed_us=v.elapsed_us, policy=v.policy, streamed=v.streamed,
    )


def outcome_events(o: Outcome) -> list[Event]:
    """The inference event of a finished request, and one guardrail event per side that ran.

    On the request path (≈10 µs): plain keyword construction, one clock read, no copies.
    """
    adm = o.admission
    req, p, params, guard = adm.request, adm.principal, adm.request.params, adm.guard
    served = adm.served[-1] if adm.served else None
    ts_ms = time.time_ns() // 1_000_000
    inp = guard.input if guard is not None else None
    out = guard.output if guard is not None else None
    types: tuple[str, ...] = ()
    if (inp is not None and inp.finding_counts) or (out is not None and out.finding_counts):
        types = tuple(sorted({*(inp.finding_counts if inp else ()), *(out.finding_counts if out else ())}))
    rid = req.request_id
    events: list[Event] = [InferenceEvent(
        event_id=rid, ts_ms=ts_ms, tenant=p.tenant, key_id=p.key_id, request_id=rid, trace_id=req.trace_id,
        span_id=req.span_id, user=req.user, model=req.model, model_version=adm.model_version,
        adapter=(served.adapter if served else adm.route.adapter) or "", engine=served.kind if served else "",
        canary_arm=adm.arm, operation=req.operation, prompt=req.prompt, messages=tuple(Message(m.role, m.content) for m in req.messages),
        response=o.text, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
        seed=params.seed, stop=params.stop, tokens_in=o.usage.prompt_tokens, tokens_out=o.usage.completion_tokens,
        ttft_ms=(o.ttft_s or 0.0) * 1000.0, latency_ms=o.latency_s * 1000.0, status=o.status,  # type: ignore[arg-type]
        error_code=o.error_code, finish_reason=o.finish_reason or "", cache_hit=adm.cached is not None,
        stream=req.stream, input_action=inp.action if inp is not None else "allow",
        output_action=out.action if out is not None else "allow", guardrail_types=types, cost_usd=o.cost_usd,
    )]
    for v in (inp, out):
        if v is not None:
            events.append(_guardrail_event(v, ts_ms=ts_ms, tenant=p.tenant, key_id=p.key_id, model=req.model,
                                           inference_id=rid))
    return events


def refusal_events(principal: Principal, request: InferenceRequest, error: ServoloopError, *,
                   now_ms: int | None = None) -> list[Event]:
    """Events for a request refused before it reached an engine.

    Only guardrail blocks are recorded: they are what operators watch (attack rates per tenant) and what
    the red-team evaluation reads back. Auth, validation and rate-limit refusals stay in the metrics.
    The prompt is not recorded: a blocked input is exactly the text that must not be stored.
    """
    if not isinstance(error, GuardrailBlocked) or error.summary is None:
        return []
    v = error.summary
    request_id = request.request_id
    inference = InferenceEvent(
        event_id=request_id, tenant=principal.tenant, key_id=principal.key_id, request_id=request_id,
        trace_id=request.trace_id, span_id=request.span_id, user=request.user, model=request.model,
        operation=request.operation, stream=request.stream, max_tokens=request.params.max_tokens,
        temperature=request.params.temperature, top_p=request.params.top_p,
        status="blocked", error_code=error.code, input_action="block", guardrail_types=tuple(sorted(v.finding_counts)),
        latency_ms=(time.monotonic() - request.received_at) * 1000.0,
        **({"ts_ms": now_ms} if now_ms is not None else {}),  # type: ignore[arg-type]
    )
    return [inference, _guardrail_event(v, ts_ms=inference.ts_ms, tenant=principal.tenant, key_id=principal.key_id,
                                        model=request.model, inference_id=request_id)]


class EventEmitter:
    """The service observer that publishes each request's events; it never raises into the request path."""

    def __init__(self, publisher: EventPublisher):
        publish = publisher.publish
        self._publish_many: Callable[[Sequence[Event]], None] = getattr(
            publisher, "publish_many", lambda events: [publish(e) for e in events])

    def __call__(self, outcome: Outcome) -> None:
        self._publish_many(outcome_events(outcome))

    def refused(self, principal: Principal, request: InferenceRequest, error: ServoloopError) -> None:
        self._publish_many(refusal_events(principal, request, error))
