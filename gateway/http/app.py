"""The HTTP front end: OpenAI-compatible API, the Feedback API, health, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.http.errors import error_response
from gateway.http.feedback import build_feedback_router
from gateway.http.openai import Handler, build_router, json_response
from schemas.errors import InvalidRequest, NotFound, ServoloopError
from schemas.openai import error_body

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)


class FastPath:
    """ASGI entry: the hot OpenAI routes go straight to their handlers, everything else to FastAPI.

    The handlers are the ones FastAPI also routes (and documents in its OpenAPI schema); the fast path
    only skips the middleware stack, which costs more than the rest of the request path together.
    """

    def __init__(self, app: FastAPI, routes: dict[tuple[str, str], Handler]):
        self.app = app
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._routes.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except ServoloopError as e:
            response = error_response(e)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = json_response(error_body("internal error; see the gateway log", type_="server_error",
                                                code="internal_error"), status=500)
        await response(scope, receive, send)


def create_http_app(gw: Gateway) -> FastPath:
    app = FastAPI(title="servoloop gateway", version="0.1.0", docs_url="/docs", redoc_url=None)
    router, hot = build_router(gw)
    app.include_router(router)
    app.include_router(build_feedback_router(gw))
    gw.extend_http(app)

    @app.exception_handler(ServoloopError)
    async def _servoloop_error(request: Request, exc: ServoloopError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(InvalidRequest(f"'{loc}': {first['msg']}", param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"))
        code = "method_not_allowed" if exc.status_code == 405 else "http_error"
        return json_response(error_body(str(exc.detail), type_="invalid_request_error", code=code),
                             status=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return json_response(error_body("internal error; see the gateway log", type_="server_error",
                                        code="internal_error"), status=500)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        report = gw.readiness()
        return json_response(report, status=200 if report["ready"] else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return FastPath(app, hot)
