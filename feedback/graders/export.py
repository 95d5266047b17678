"""Grades outside servoloop: OpenTelemetry `gen_ai.evaluation.result` events and Langfuse scores.

    worker = GradingWorker(..., exporters=[OtelGradeExporter(tracer_provider), LangfuseGradeScores(...)])

OTel: one short `gen_ai.evaluation` span per grade, parented to the graded inference's span (its stored
`trace_id`/`span_id`), carrying the `gen_ai.evaluation.result` event with the GenAI semantic-convention
attributes (`gen_ai.evaluation.name`, `.score.value`, `.score.label`, `.explanation`, `gen_ai.response.id`);
so an OTLP backend shows the grade on the inference's trace. Langfuse: each grade posted to
`{host}/api/public/scores` as a NUMERIC score on the inference's trace, its id the grade's event id (a
retried post updates the same score). Exporters run after the grades are published, off the request
path; a failing exporter is logged and never fails a grading cycle.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from schemas.events import GradeEvent, InferenceEvent

log = logging.getLogger(__name__)

EVALUATION_EVENT = "gen_ai.evaluation.result"
SCORES_PATH = "/api/public/scores"


class GradeExporter(Protocol):
    """Sends grades somewhere; `inferences` maps each grade's `target_id` to its inference (for trace ids)."""

    async def export(self, grades: Sequence[GradeEvent], inferences: Mapping[str, InferenceEvent]) -> None: ...


def evaluation_attributes(grade: GradeEvent) -> dict[str, Any]:
    """The `gen_ai.evaluation.result` attributes of one grade (OTel GenAI semantic conventions)."""
    attrs: dict[str, Any] = {"gen_ai.evaluation.name": grade.grader, "gen_ai.evaluation.score.value": grade.score,
                             "gen_ai.evaluation.score.label": grade.label, "gen_ai.response.id": grade.target_id,
                             "servoloop.grader.version": grade.grader_version,
                             "servoloop.model_version": grade.model_version}
    if grade.explanation:
        attrs["gen_ai.evaluation.explanation"] = grade.explanation[:2000]
    if grade.other_id:
        attrs["servoloop.grade.other_id"] = grade.other_id
    return attrs


def langfuse_score_body(grade: GradeEvent, trace_id: str) -> dict[str, Any]:
    """The Langfuse score for one grade: NUMERIC, named after its grader, the label and explanation kept."""
    return {"id": grade.event_id, "traceId": trace_id, "name": grade.grader, "value": grade.score,
            "dataType": "NUMERIC", "comment": grade.label,
            "metadata": {"inference_id": grade.target_id, "label": grade.label, "tenant": grade.tenant,
                         "grader_version": grade.grader_version, "model_version": grade.model_version,
                         "explanation": grade.explanation[:2000]}}


def _hex_id(value: str, length: int) -> int | None:
    try:
        n = int(value, 16) if len(value) == length else 0
    except ValueError:
        return None
    return n or None


class OtelGradeExporter:
    """Grades as `gen_ai.evaluation.result` events on spans parented to the graded inference's span."""

    def __init__(self, tracer_provider: Any = None):
        from opentelemetry import trace

        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("servoloop.graders")

    def _emit(self, grades: Sequence[GradeEvent], inferences: Mapping[str, InferenceEvent]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        for g in grades:
            inf = inferences.get(g.target_id)
            context = None
            if inf is not None:
                trace_id, span_id = _hex_id(inf.trace_id, 32), _hex_id(inf.span_id, 16)
                if trace_id and span_id:
                    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
                    context = trace.set_span_in_context(NonRecordingSpan(parent))
            with self._tracer.start_as_current_span("gen_ai.evaluation", context=context) as span:
                span.add_event(EVALUATION_EVENT, evaluation_attributes(g))

    async def export(self, grades: Sequence[GradeEvent], inferences: Mapping[str, InferenceEvent]) -> None:
        await asyncio.to_thread(self._emit, grades, inferences)


class LangfuseGradeScores:
    """Posts each grade of a traced inference as a Langfuse score (retries with backoff on 429/5xx/network)."""

    def __init__(self, host: str, public_key: str, secret_key: str, *, retries: int = 3, timeout_s: float = 10.0):
        import httpx

        auth = "Basic " + base64.b64encode(f"{public_key}:{secret_key}".encode()).decode()
        self._url = host.rstrip("/") + SCORES_PATH
        self._client = httpx.AsyncClient(timeout=timeout_s, headers={"Authorization": auth})
        self._retries = retries
        self.sent = 0
        self.dropped = 0

    async def _post(self, body: dict[str, Any]) -> bool:
        import httpx

        for attempt in range(self._retries + 1):
            try:
                r = await self._client.post(self._url, json=body)
            except httpx.HTTPError as e:
                log.warning("Langfuse grade score: %s (attempt %d)", e, attempt + 1)
            else:
                if r.status_code < 300:
                    return True
                if r.status_code != 429 and r.status_code < 500:
                    log.warning("Langfuse refused a grade score (%d): %s", r.status_code, r.text[:200])
                    return False
            await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        return False

    async def export(self, grades: Sequence[GradeEvent], inferences: Mapping[str, InferenceEvent]) -> None:
        for g in grades:
            inf = inferences.get(g.target_id)
            if inf is None or not inf.trace_id:
                continue  # no trace to attach the score to
            if await self._post(langfuse_score_body(g, inf.trace_id)):
                self.sent += 1
            else:
                self.dropped += 1

    async def aclose(self) -> None:
        await self._client.aclose()
