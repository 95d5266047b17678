"""The admin API under /admin/v1 (JSON, admin scope) and the operator dashboard page under /admin/dashboard.

Mounted into the gateway's HTTP app by `admin_extension(store, authenticate, ...)` (a gateway
`http_extensions` entry), so the process that owns the store serves it and nothing else opens chDB.
Errors are the gateway's JSON shape, `{"error": {"message", "type", "param", "code"}}`, produced here
(feedback must not import gateway) for the statuses this API uses.

Who sees what: every route needs the admin scope. An operator's admin key (its tenant is one of
`operator_tenants`, `gateway.auth.operator_tenants`, default `ops`) sees every tenant and may pick one with
`?tenant=` (none: all); any other tenant's admin key is tenant-scoped: it sees only its own tenant's rows
(naming another tenant is 403) and acts only on its own tenant's versions.

Model actions (approve, promote, rollback) are requests: until the registry of the retraining issue
serves its own API, a POST records the operator's request as a `ModelEvent` with state
`<action>_requested` (actor = the key id) on the event path and answers 202; the registry acts on those
events and records the real state change (`active`, `rolled_back`, ...) as its own `ModelEvent`.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import FileResponse, RedirectResponse, Response

from feedback import budgets
from feedback.dashboard import reads
from feedback.dashboard.reads import Span
from feedback.store import Store
from schemas.errors import (
    ErrorKind,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServoloopError,
)
from schemas.events import Event, ModelEvent
from schemas.openai import error_body

log = logging.getLogger(__name__)

ACTIONS = ("approve", "promote", "rollback")
STATIC = Path(__file__).parent / "static"
_STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_STATUS = {ErrorKind.INVALID_ARGUMENT: 400, ErrorKind.FAILED_PRECONDITION: 400, ErrorKind.UNAUTHENTICATED: 401,
           ErrorKind.PERMISSION_DENIED: 403, ErrorKind.NOT_FOUND: 404, ErrorKind.UNAVAILABLE: 503}
_TYPE = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}")
_DURATION = re.compile(r"(\d{1,9})(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_NICE_STEPS_S = (1, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 10800, 21600, 43200, 86400, 604800)
MAX_SPAN_MS = 90 * 86_400_000
MAX_BUCKETS = 2000
MAX_REASON = 1000
MAX_BODY = 16_384
OPERATOR_TENANTS = ("ops",)  # the default of gateway.auth.operator_tenants


class ActionsUnavailable(ServoloopError):
    """This process has no event sink, so it cannot record model action requests."""

    kind = ErrorKind.UNAVAILABLE
    code = "actions_unavailable"


class AdminPrincipal(Protocol):
    key_id: str
    tenant: str
    scopes: frozenset[str]


Authenticate = Callable[[str | None], AdminPrincipal]
"""`Authorization` header value -> principal; raises a ServoloopError (Unauthenticated) for a bad key."""


def plotly_js() -> Path:
    """plotly.min.js of the installed plotly package: served from there, so the repository holds no copy."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def admin_extension(store: Store, authenticate: Authenticate, *, publish: Callable[[Event], None] | None = None,
                    health: Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]] | None = None,
                    report_dir: Path | None = None, prices: Mapping[str, tuple[float, float]] | None = None,
                    refresh_s: float = 10.0,
                    operator_tenants: Collection[str] = OPERATOR_TENANTS) -> Callable[[FastAPI], None]:
    """A gateway HTTP extension adding the admin API and the dashboard.

    `publish` is the event sink (model action requests; without it the dashboard is read-only), `health`
    reports the pipeline, `report_dir` is where drift reports may be served from (nothing else is),
    `prices` maps a model to (price per 1k input tokens, per 1k output tokens); admin keys of
    `operator_tenants` see every tenant, other admin keys only their own.
    """
    router = build_admin_router(store, authenticate, publish=publish, health=health, report_dir=report_dir,
                                prices=prices, refresh_s=refresh_s, operator_tenants=operator_tenants)
    return lambda app: app.include_router(router)


def problem(err: ServoloopError) -> Response:
    """The gateway's JSON error for `err`."""
    status = _STATUS.get(err.kind, 500)
    type_ = _TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    body = error_body(err.message, type_=type_, code=err.code, param=err.param,
                      **({"details": err.details} if err.details else {}))
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers)


class _AdminRoute(APIRoute):
    """Answers ServoloopErrors with the JSON error itself, whatever app it is mounted in."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except ServoloopError as e:
                if _STATUS.get(e.kind, 500) >= 500:
                    log.warning("admin API %s %s: %s", request.method, request.url.path, e.message)
                return problem(e)
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return problem(ServoloopError("internal error; see the gateway log"))

        return run


def _json(value: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


# -- input -----------------------------------------------------------------------------------------------------------


def parse_time(text: str, *, field: str, now_ms: int) -> int:
    """Epoch ms from a duration back from now (`15m`, `24h`, `7d`), epoch milliseconds, or ISO 8601."""
    text = text.strip()
    if m := _DURATION.fullmatch(text):
        return now_ms - int(m[1]) * _UNIT_MS[m[2]]
    if text.isdigit() and len(text) <= 15:
        return int(text)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{field}' must be a duration back from now (15m, 24h, 7d), epoch milliseconds or "
                             f"an ISO 8601 time; got {text[:40]!r}", param=field) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"'{field}' needs a time zone (e.g. Z)", param=field)
    return int(parsed.timestamp() * 1000)


def parse_span(query: Mapping[str, str], *, now_ms: int, default_since: str = "24h") -> Span:
    """The window `[since, until)` and bucket width `step` of a request. Raises InvalidRequest naming the field."""
    until = parse_time(query["until"], field="until", now_ms=now_ms) if query.get("until") else now_ms
    since = parse_time(query.get("since") or default_since, field="since", now_ms=until)
    if since >= until:
        raise InvalidRequest("'since' must be before 'until'", param="since")
    if until - since > MAX_SPAN_MS:
        raise InvalidRequest(f"the window is longer than {MAX_SPAN_MS // 86_400_000} days", param="since")
    if step_text := query.get("step"):
        m = _DURATION.fullmatch(step_text.strip())
        step_ms = int(step_text) * 1000 if step_text.isdigit() and len(step_text) <= 9 else (
            int(m[1]) * _UNIT_MS[m[2]] if m else None)
        if step_ms is None or step_ms < 1000:
            raise InvalidRequest("'step' must be at least 1s (seconds, or a duration such as 5m)", param="step")
        if (until - since) / step_ms > MAX_BUCKETS:
            raise InvalidRequest(f"'step' makes more than {MAX_BUCKETS} buckets for this window", param="step")
        step_s = step_ms // 1000
    else:
        step_s = next((s for s in _NICE_STEPS_S if (until - since) / (s * 1000) <= 200), _NICE_STEPS_S[-1])
    return Span(since, until, step_s)


def parse_name(value: str | None, *, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not _NAME.fullmatch(value):
        raise InvalidRequest(f"'{field}' must be 1-200 characters of letters, digits and ._:@+-", param=field)
    return value


def parse_limit(value: str | None, *, default: int = 50, maximum: int = 1000) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {maximum}", param="limit")
    return int(value)


def report_file(reports: Path | None, relative: str) -> Path | None:
    """The HTML file at `relative` inside the resolved directory `reports`, links followed; None for anything
    else (outside it, not .html, missing, unreadable name). Never raises."""
    if reports is None or not relative or "\0" in relative:
        return None
    try:
        path = (reports / relative).resolve()
        if not path.is_relative_to(reports) or path.suffix.lower() != ".html" or not path.is_file():
            return None
    except (OSError, ValueError):
        return None
    return path


def report_link(reports: Path | None, report_path: str | None) -> str | None:
    """The API path serving `report_path` (absolute, or relative to `reports`), or None if it is not servable."""
    if reports is None or not report_path:
        return None
    try:
        path = Path(report_path)
        path = path.resolve() if path.is_absolute() else (reports / path).resolve()
        relative = path.relative_to(reports).as_posix()
    except (OSError, ValueError):
        return None
    return "/admin/v1/drift/reports/" + quote(relative) if report_file(reports, relative) else None


def _check_query(request: Request, allowed: set[str]) -> Mapping[str, str]:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown query parameter '{unknown[0]}' (expected: {', '.join(sorted(allowed))})",
                             param=unknown[0])
    return request.query_params


# -- the router ------------------------------------------------------------------------------------------------------


def require_admin(authenticate: Authenticate, request: Request) -> AdminPrincipal:
    """The principal of an admin key; raises Unauthenticated or PermissionDenied (no admin scope)."""
    principal = authenticate(request.headers.get("authorization"))
    if "admin" not in principal.scopes:
        raise PermissionDenied("this key lacks the 'admin' scope "
                               f"(it has: {', '.join(sorted(principal.scopes))})")
    return principal


def is_operator(principal: AdminPrincipal, operator_tenants: Collection[str]) -> bool:
    """An operator's key sees and acts on every tenant; any other admin key only on its own."""
    return principal.tenant in operator_tenants


def visible_tenant(principal: AdminPrincipal, wanted: str | None, operator_tenants: Collection[str]) -> str | None:
    """The tenant a read covers (None: every tenant). Raises PermissionDenied if a tenant-scoped key names another."""
    wanted = parse_name(wanted, field="tenant")
    if is_operator(principal, operator_tenants):
        return wanted
    if wanted is not None and wanted != principal.tenant:
        raise PermissionDenied(f"this key sees only its own tenant ({principal.tenant!r})", param="tenant")
    return principal.tenant


def build_admin_router(store: Store, authenticate: Authenticate, *, publish: Callable[[Event], None] | None = None,
                       health: Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]] | None = None,
                       report_dir: Path | None = None, prices: Mapping[str, tuple[float, float]] | None = None,
                       refresh_s: float = 10.0, operator_tenants: Collection[str] = OPERATOR_TENANTS) -> APIRouter:
    router = APIRouter(route_class=_AdminRoute, tags=["admin"])
    reports = report_dir.resolve() if report_dir is not None else None

    def admin(request: Request) -> AdminPrincipal:
        return require_admin(authenticate, request)

    def view(request: Request, q: Mapping[str, str]) -> str | None:
        """The tenant this request may read: None = every tenant (an operator's key without `?tenant=`)."""
        return visible_tenant(admin(request), q.get("tenant"), operator_tenants)

    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    @router.get("/admin/v1/overview")
    async def overview(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms())
        out: dict[str, Any] = {"server_time_ms": now_ms(), "since_ms": span.start_ms, "until_ms": span.end_ms,
                               "tables": await reads.overview(store, span, tenant=tenant), "tenant": tenant,
                               "actions_enabled": publish is not None,
                               "refresh_s": refresh_s, "store": {"database": store.database}}
        if health is not None and tenant is None:
            report = health()
            out["health"] = dict(await report if inspect.isawaitable(report) else report)
        return _json(out)

    @router.get("/admin/v1/metrics")
    async def metrics(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "metric", "model", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms())
        series = await reads.quality_series(store, span, metric=parse_name(q.get("metric"), field="metric"),
                                            model=parse_name(q.get("model"), field="model"), tenant=tenant)
        return _json({"since_ms": span.start_ms, "until_ms": span.end_ms, "series": series})

    @router.get("/admin/v1/drift")
    async def drift(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "model", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms(), default_since="7d")
        scores = await reads.drift_scores(store, span, model=parse_name(q.get("model"), field="model"), tenant=tenant)
        for s in scores:
            s["report_url"] = report_link(reports, s.pop("report_path"))
        return _json({"since_ms": span.start_ms, "until_ms": span.end_ms, "features": scores})

    @router.get("/admin/v1/drift/reports/{path:path}")
    async def drift_report(request: Request, path: str) -> Response:
        principal = admin(request)
        file = report_file(reports, path)
        if file is None or not is_operator(principal, operator_tenants):  # a run's report covers every tenant
            raise NotFound("no such drift report", param="path")
        return FileResponse(file, media_type="text/html",
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @router.get("/admin/v1/guardrails")
    async def guardrails(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "step", "model", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms())
        rates = await reads.guardrail_rates(store, span, model=parse_name(q.get("model"), field="model"), tenant=tenant)
        return _json({"since_ms": span.start_ms, "until_ms": span.end_ms, "step_s": span.step_s, **rates})

    @router.get("/admin/v1/latency")
    async def latency(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "step", "model", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms())
        models = await reads.latency_cost(store, span, model=parse_name(q.get("model"), field="model"), prices=prices,
                                          tenant=tenant)
        return _json({"since_ms": span.start_ms, "until_ms": span.end_ms, "step_s": span.step_s,
                      "priced": sorted(prices or {}), "models": models})

    @router.get("/admin/v1/models")
    async def models(request: Request) -> Response:
        q = _check_query(request, {"model", "tenant"})
        tenant = view(request, q)
        timeline = await reads.model_timeline(store, model=parse_name(q.get("model"), field="model"), tenant=tenant)
        return _json({"actions": list(ACTIONS) if publish is not None else [], "models": timeline})

    @router.get("/admin/v1/canary")
    async def canary(request: Request) -> Response:
        q = _check_query(request, {"model", "tenant"})
        tenant = view(request, q)
        model = parse_name(q.get("model"), field="model")
        # A canary's arms are compared over every tenant's traffic: not a per-tenant view (yet), so none for one.
        rows = await reads.canaries(store, now_ms=now_ms(), model=model) if tenant is None else []
        return _json({"server_time_ms": now_ms(), "canaries": rows})

    @router.get("/admin/v1/triggers")
    async def triggers(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "model", "limit", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms(), default_since="7d")
        rows = await reads.triggers(store, span, model=parse_name(q.get("model"), field="model"),
                                    limit=parse_limit(q.get("limit")), tenant=tenant)
        return _json({"triggers": rows})

    @router.get("/admin/v1/alerts")
    async def alerts(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "limit", "status", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms(), default_since="7d")
        statuses = tuple(s for s in (q.get("status") or "alert").split(",") if s)
        if not statuses or not set(statuses) <= {"alert", "warn", "ok", "insufficient_data"}:
            raise InvalidRequest("'status' must be a comma-separated list of alert, warn, ok, insufficient_data",
                                 param="status")
        rows = await reads.alerts(store, span, statuses=statuses, limit=parse_limit(q.get("limit")), tenant=tenant)
        return _json({"alerts": rows})

    @router.get("/admin/v1/tenants")
    async def tenants(request: Request) -> Response:
        tenant = view(request, _check_query(request, set()))
        return _json({"tenants": [tenant] if tenant is not None else await reads.tenants(store),
                      "all": tenant is None})

    @router.get("/admin/v1/spend")
    async def spend(request: Request) -> Response:
        q = _check_query(request, {"since", "until", "step", "tenant"})
        tenant = view(request, q)
        span = parse_span(q, now_ms=now_ms())
        in_force = await budgets.budget_status(store, now_ms() / 1000, tenant=tenant)
        alerts = await budgets.alert_rows(store, span.start_ms, tenant=tenant)
        return _json({"since_ms": span.start_ms, "until_ms": span.end_ms, "step_s": span.step_s,
                      "series": await reads.spend_series(store, span, tenant=tenant), "budgets": in_force,
                      "alerts": [msgspec.structs.asdict(a) for a in alerts if a.ts_ms < span.end_ms]})

    @router.post("/admin/v1/models/{model}/versions/{version}/{action}", status_code=202)
    async def model_action(request: Request, model: str, version: str, action: str) -> Response:
        principal = admin(request)
        if action not in ACTIONS:
            raise NotFound(f"unknown action {action[:40]!r} (expected one of: {', '.join(ACTIONS)})", param="action")
        parse_name(model, field="model")
        parse_name(version, field="version")
        reason = await _reason(request)
        if publish is None:
            raise ActionsUnavailable("model actions are off in this process (no event sink): the dashboard is "
                                     "read-only", param="action")
        current = await reads.version_state(store, model, version)
        if current is None or not (is_operator(principal, operator_tenants) or current["tenant"] == principal.tenant):
            raise NotFound(f"model {model!r} has no version {version!r}", param="version")
        event = ModelEvent(tenant=current["tenant"] or principal.tenant, model=model, version_id=version,
                           base_model=current["base_model"], adapter_path=current["adapter_path"],
                           state=f"{action}_requested", previous_state=current["state"],
                           reason=reason or f"operator requested {action}", actor=principal.key_id)
        publish(event)
        log.info("model action requested: %s %s@%s by key %s", action, model, version, principal.key_id)
        return _json({"event_id": event.event_id, "status": "requested", "action": action, "model": model,
                      "version_id": version, "state": event.state, "previous_state": event.previous_state}, 202)

    @router.get("/admin", include_in_schema=False)
    @router.get("/admin/", include_in_schema=False)
    async def admin_root() -> Response:
        return RedirectResponse("/admin/dashboard/")

    @router.get("/admin/dashboard", include_in_schema=False)
    @router.get("/admin/dashboard/", include_in_schema=False)
    async def dashboard_page() -> Response:
        # The page holds no data: it asks for an admin key and reads everything through the API.
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @router.get("/admin/dashboard/static/{name}", include_in_schema=False)
    async def dashboard_static(name: str) -> Response:
        if name == "plotly.min.js":
            return FileResponse(plotly_js(), media_type="text/javascript",
                                headers={"Cache-Control": "public, max-age=86400"})
        if name not in _STATIC_FILES:
            raise NotFound("no such file", param="name")
        return FileResponse(STATIC / name, media_type=_STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    return router


async def json_body(request: Request, *, example: str = "") -> object:
    """The request's JSON body (an empty body reads as `{}`), refused past MAX_BODY bytes, before or while reading."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise InvalidRequest(f"the body is larger than {MAX_BODY} bytes", param="body")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise InvalidRequest(f"the body is larger than {MAX_BODY} bytes", param="body")
    if not body.strip():
        return {}
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise InvalidRequest(f"the body must be a JSON object{example}", param="body") from None


async def _reason(request: Request) -> str:
    """The optional `reason` of an action request body (`{"reason": "..."}`; an empty body is fine)."""
    data = await json_body(request, example=' such as {"reason": "..."}')
    if not isinstance(data, dict) or set(data) - {"reason"}:
        raise InvalidRequest("the body may hold only 'reason'", param="body")
    reason = data.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise InvalidRequest(f"'reason' must be a string of at most {MAX_REASON} characters", param="reason")
    return reason
