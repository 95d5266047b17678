"""Request-path cost of tracing, on and off: what runs on the event loop per request (a few seconds).

Off: the trace ids assigned at admission and the `traceparent` returned to the client. On: the same,
plus the finish observer building the request's four spans and queueing them on BatchSpanProcessor,
and the Langfuse trace index. Export (OTLP protobuf encoding and HTTP) runs in the processor's thread;
its encoding cost per request is measured separately, since it still takes CPU (and the GIL) somewhere.

    .venv/bin/python benchmarks/tracing_observer.py
"""

from __future__ import annotations

import logging
import sys
import timeit
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from benchmarks.common import write_result
from gateway.auth import Principal
from gateway.guarding import GuardState
from gateway.langfuse import TraceIndex
from gateway.limits import KeyLimits
from gateway.request import ChatMessage, InferenceRequest, SamplingParams, Usage
from gateway.router import ModelRoute, Served
from gateway.service import Admission, Outcome
from gateway.settings import TracingSettings
from gateway.tracing import RequestTracer, assign_trace, response_traceparent, sample_bound
from guardrails import GuardrailVerdict


class Discard(SpanExporter):
    """Keeps the last batch, so the encoding cost can be measured on real spans."""

    last: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        Discard.last = list(spans)
        return SpanExportResult.SUCCESS


def outcome(sampled: bool) -> Outcome:
    req = InferenceRequest(model="remote", operation="chat", params=SamplingParams(max_tokens=64, temperature=0.7),
                           messages=(ChatMessage("system", "You are terse."), ChatMessage("user", "What is 2+2?")),
                           request_id="0192f0c1-7a6b-7cc0-9f0e-4b1a2c3d4e5f")
    assign_trace(req, sample_bound(1.0) if sampled else None)
    verdict = GuardrailVerdict(side="input", action="allow", finding_counts={}, detectors={"pii": "1.0.0"},
                               elapsed_us=40, policy="default/*")
    guard = GuardState(policy=None, canary=None, input=verdict,  # type: ignore[arg-type]
                       output=GuardrailVerdict(side="output", action="allow", finding_counts={}, detectors={},
                                               elapsed_us=25, policy="default/*", streamed=True))
    principal = Principal("k1", "acme", frozenset({"infer"}), KeyLimits(600, 200_000, 16), False)
    route = ModelRoute("remote", SimpleNamespace(kind="remote"))  # type: ignore[arg-type]
    adm = Admission(principal, req, route, "http", 12, 76, None, None, guard,
                    served=[Served("remote", "remote", "base", None)], admitted_at=req.received_at + 0.0002,
                    sampled=sampled)
    return Outcome(adm, "4", "stop", Usage(12, 1), "ok", "", 0.021, 0.034)


def per_call_us(fn: Any, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    n = 20_000
    off = outcome(sampled=False)
    on = outcome(sampled=True)
    settings = TracingSettings(enabled=True, endpoint="http://127.0.0.1:9", max_queue_size=1_000_000,
                               max_export_batch_size=512, schedule_delay_ms=50)
    tracer = RequestTracer(settings, [Discard()])
    index = TraceIndex(100_000)
    bound = sample_bound(1.0)
    req_off, req_on = off.admission.request, on.admission.request

    def request_off() -> None:
        assign_trace(req_off, None)
        response_traceparent(off.admission)

    def request_on() -> None:
        assign_trace(req_on, bound)
        response_traceparent(on.admission)
        tracer(on)
        index(on)

    figures = {
        "requests_timed": n,
        "off_us_per_request": round(per_call_us(request_off, n), 2),
        "on_us_per_request": round(per_call_us(request_on, n), 2),
        "on_observer_only_us": round(per_call_us(lambda: tracer(on), n), 2),
        "unsampled_observer_us": round(per_call_us(lambda: tracer(off), n), 3),
    }
    tracer.force_flush()
    batch = Discard.last[:512]  # a full export batch: 128 requests' spans, encoded as the exporter does
    figures["export_encoding_us_per_request_background"] = round(
        per_call_us(lambda: encode_spans(batch).SerializeToString(), 20) / (len(batch) / 4), 2)
    tracer.shutdown()
    path = write_result("tracing_observer", figures)
    for k, v in figures.items():
        print(f"{k:48s} {v}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
