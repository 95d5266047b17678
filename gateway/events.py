"""Telemetry emission: every finished or refused request becomes events on the event sink.

Pure functions turn an `Outcome` (or a refusal) into `InferenceEvent` and `GuardrailEvent`s; the
`EventEmitter` observer hands them to a publisher whose `publish` only enqueues (the durable sink in
`feedback/`), so the request path never waits on Kafka, ClickHouse or disk. The texts recorded are
the ones that left the guardrails: the redacted prompt the engine saw and the answer the client got.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from gateway.auth import Principal
from gateway.request import InferenceRequest
from gateway.service import Outcome
from guardrails import GuardrailBlocked, GuardrailVerdict
from schemas.errors import ServoloopError
from schemas.events import Event, GuardrailEvent, InferenceEvent, Message

log = logging.getLogger(__name__)


class EventPublisher(Protocol):
    """Where the gateway puts events: `publish` must not block (the sink queues, spools and ships)."""

    def publish(self, event: Event) -> None: ...


def _request_fields(request: InferenceRequest) -> dict[str, object]:
    p = request.params
    return {
        "request_id": request.request_id, "trace_id": request.trace_id, "span_id": request.span_id,
        "user": request.user, "model": request.model, "operation": request.operation,
        "prompt": request.prompt, "messages": tuple(Message(m.role, m.content) for m in request.messages),
        "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed, "stop": p.stop,
        "stream": request.stream,
    }


def _guardrail_event(v: GuardrailVerdict, *, tenant: str, key_id: str, model: str, request_id: str,
                     inference_id: str) -> GuardrailEvent:
    return GuardrailEvent(
        tenant=tenant, key_id=key_id, model=model, request_id=request_id, inference_id=inference_id, side=v.side,
        action=v.action, finding_counts=dict(v.finding_counts), detectors=dict(v.detectors),
        elapsed_us=v.elapsed_us, policy=v.policy, streamed=v.streamed,
    )


def outcome_events(o: Outcome) -> list[Event]:
    """The inference event of a finished request, and one guardrail event per side that ran."""
    adm = o.admission
    req, p = adm.request, adm.principal
    served = adm.served[-1] if adm.served else None
    verdicts = [v for v in ((adm.guard.input, adm.guard.output) if adm.guard else ()) if v is not None]
    types = sorted({t for v in verdicts for t in v.finding_counts})
    inference = InferenceEvent(
        event_id=req.request_id, tenant=p.tenant, key_id=p.key_id, **_request_fields(req),  # type: ignore[arg-type]
        model_version=adm.model_version, adapter=(served.adapter if served else adm.route.adapter) or "",
        engine=served.kind if served else "", response=o.text,
        tokens_in=o.usage.prompt_tokens, tokens_out=o.usage.completion_tokens,
        ttft_ms=(o.ttft_s or 0.0) * 1000.0, latency_ms=o.latency_s * 1000.0, status=o.status,  # type: ignore[arg-type]
        error_code=o.error_code, finish_reason=o.finish_reason or "", cache_hit=adm.cached is not None,
        input_action=adm.guard.input.action if adm.guard else "allow",
        output_action=adm.guard.output.action if adm.guard and adm.guard.output else "allow",
        guardrail_types=tuple(types),
    )
    events: list[Event] = [inference]
    for v in verdicts:
        events.append(_guardrail_event(v, tenant=p.tenant, key_id=p.key_id, model=req.model,
                                       request_id=req.request_id, inference_id=req.request_id))
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
    return [inference, _guardrail_event(v, tenant=principal.tenant, key_id=principal.key_id, model=request.model,
                                        request_id=request_id, inference_id=request_id)]


class EventEmitter:
    """The service observer that publishes each request's events; it never raises into the request path."""

    def __init__(self, publisher: EventPublisher):
        self._publish = publisher.publish

    def __call__(self, outcome: Outcome) -> None:
        for event in outcome_events(outcome):
            self._publish(event)

    def refused(self, principal: Principal, request: InferenceRequest, error: ServoloopError) -> None:
        for event in refusal_events(principal, request, error):
            self._publish(event)
