"""Grades leave servoloop as OTel `gen_ai.evaluation.result` events on the inference's trace and as Langfuse
scores: through the real OTel SDK (in-memory span exporter) and a real HTTP server standing in for Langfuse."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from feedback.graders.export import LangfuseGradeScores, OtelGradeExporter
from feedback.graders.judge import RuleJudge
from feedback.graders.settings import GraderSettings, GradingSettings
from feedback.graders.worker import GradingWorker
from feedback.monitors.runner import store_publisher
from feedback.store import Store, write_events
from schemas.events import InferenceEvent, Message, now_ms

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def judged_only() -> GradingSettings:
    return GradingSettings(settle_s=0, graders={"judge": GraderSettings(sample_rate=1.0)})


async def seed(store: Store) -> list[InferenceEvent]:
    infs = [InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=now_ms() - 10_000,
                           trace_id=TRACE, span_id=SPAN, messages=(Message("user", "What is the capital of France?"),),
                           response="Sure! The capital of France is Paris."),
            InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=now_ms() - 9_000,
                           messages=(Message("user", "Hi"),), response="Ugh. What do you want?")]  # untraced
    await write_events(store, infs)
    return infs


async def test_each_grade_is_an_evaluation_event_on_a_span_parented_to_its_inference(store: Store) -> None:
    infs = await seed(store)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    worker = GradingWorker(store, store_publisher(store), judged_only(), graders={"judge": RuleJudge()},
                           exporters=[OtelGradeExporter(provider)])
    report = await worker.run_once()
    assert report.graded == {"judge": 2}
    finished = spans.get_finished_spans()
    assert len(finished) == 2
    traced = [s for s in finished if s.parent is not None]
    assert len(traced) == 1
    [span] = traced
    assert (f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (TRACE, SPAN)
    [event] = span.events
    assert event.name == "gen_ai.evaluation.result"
    assert event.attributes["gen_ai.evaluation.name"] == "judge"
    assert event.attributes["gen_ai.evaluation.score.label"] == "pass"
    assert event.attributes["gen_ai.evaluation.score.value"] == 1.0
    assert event.attributes["gen_ai.response.id"] == infs[0].event_id


@pytest.fixture
async def langfuse() -> AsyncIterator[tuple[str, list[tuple[str, dict]]]]:
    received: list[tuple[str, dict]] = []
    failures = {"left": 1}

    async def scores(request: web.Request) -> web.Response:
        if failures["left"]:  # one overloaded answer first: the exporter retries
            failures["left"] -= 1
            return web.Response(status=503)
        received.append((request.headers["Authorization"], await request.json()))
        return web.json_response({"id": "ok"})

    app = web.Application()
    app.router.add_post("/api/public/scores", scores)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", received
    await runner.cleanup()


async def test_grades_of_traced_inferences_become_langfuse_scores_on_their_trace(
        store: Store, langfuse: tuple[str, list[tuple[str, dict]]]) -> None:
    infs = await seed(store)
    host, received = langfuse
    exporter = LangfuseGradeScores(host, "pk", "sk")
    worker = GradingWorker(store, store_publisher(store), judged_only(), graders={"judge": RuleJudge()},
                           exporters=[exporter])
    await worker.run_once()
    await exporter.aclose()
    assert (exporter.sent, exporter.dropped) == (1, 0)
    [(auth, body)] = received  # the untraced inference has no trace to score
    assert auth == "Basic " + base64.b64encode(b"pk:sk").decode()
    assert (body["traceId"], body["name"], body["value"], body["dataType"]) == (TRACE, "judge", 1.0, "NUMERIC")
    assert body["metadata"]["inference_id"] == infs[0].event_id and body["comment"] == "pass"


@pytest.mark.parametrize(("export", "message"), [
    ({"otel": True}, "gateway.tracing.endpoint"),
    ({"langfuse": True}, "gateway.tracing.langfuse.host"),
])
def test_an_export_without_a_destination_is_a_config_error_before_up_starts(tmp_path, export, message) -> None:
    from schemas.errors import ConfigError
    from servoloop.settings import Settings
    from servoloop.up import System, grade_exporters

    settings = Settings(data_dir=tmp_path, grading={"export": export})
    with pytest.raises(ConfigError, match=message):
        grade_exporters(settings)
    with pytest.raises(ConfigError, match=message):
        System(settings, lambda registry: None)  # type: ignore[arg-type, return-value]
    assert grade_exporters(Settings(data_dir=tmp_path))[0] == []  # off by default
