"""A small real OTLP/HTTP collector, and a Langfuse stand-in on the same server, that record what they get.

`POST /v1/traces` takes OTLP/HTTP protobuf (`ExportTraceServiceRequest`, gzip or not) and records each
span. `/api/public/otel/v1/traces` does the same for Langfuse, and `POST /api/public/scores` records
score bodies; both Langfuse paths answer 401 unless the request carries the expected basic-auth header.
`fail_scores` makes the next N score posts answer 503 (retries).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class ReceivedSpan:
    path: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 SERVER, 1 INTERNAL
    attributes: dict[str, Any]
    status_code: int  # 0 UNSET, 1 OK, 2 ERROR
    status_message: str
    start_ns: int
    end_ns: int
    events: list[tuple[str, dict[str, Any], int]]
    resource: dict[str, Any]
    scope: str


@dataclass
class OtlpReceiver:
    langfuse_public_key: str = "pk-lf-test"
    langfuse_secret_key: str = "sk-lf-test"
    spans: list[ReceivedSpan] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, headers) of every POST
    rejected: list[str] = field(default_factory=list)  # paths answered 401
    fail_scores: int = 0
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorised(self, request: web.Request) -> bool:
        token = base64.b64encode(f"{self.langfuse_public_key}:{self.langfuse_secret_key}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {token}"

    async def _traces(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers)))
        if request.path.startswith("/api/public/") and not self._authorised(request):
            self.rejected.append(request.path)
            return web.Response(status=401)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip" and body[:2] == b"\x1f\x8b":  # aiohttp may have inflated it
            body = gzip.decompress(body)
        export = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        for rs in export.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(ReceivedSpan(
                        path=request.path, name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), kind=s.kind,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        status_code=s.status.code, status_message=s.status.message,
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        events=[(e.name, {kv.key: _value(kv.value) for kv in e.attributes}, e.time_unix_nano)
                                for e in s.events],
                        resource=resource, scope=ss.scope.name))
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def _score(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers)))
        if not self._authorised(request):
            self.rejected.append(request.path)
            return web.json_response({"message": "unauthorised"}, status=401)
        if self.fail_scores > 0:
            self.fail_scores -= 1
            return web.json_response({"message": "try later"}, status=503)
        body = await request.json()
        self.scores.append(body)
        return web.json_response({"id": body.get("id", "")})

    async def start(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/api/public/otel/v1/traces", self._traces)
        app.router.add_post("/api/public/scores", self._score)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def trace(self, trace_id: str, path: str = "/v1/traces") -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id and s.path == path]

    async def wait_for(self, condition: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Poll until `condition()` is truthy; returns its value, raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError("the receiver did not get what was expected in time")
            await asyncio.sleep(0.02)
