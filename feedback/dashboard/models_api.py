"""The registry's admin API (JSON, admin scope): versions, one version's history and lineage, an inference's
lineage, and model action requests with a canary share or a rejection.

    GET  /admin/v1/models/{model}/versions            every version's current state, the active and the canary
    GET  /admin/v1/models/{model}/versions/{version}  state, lineage (trigger, evidence, dataset, feedback), history
    GET  /admin/v1/lineage/{inference_id}             the lineage of the version that served an inference
    POST /admin/v1/models/{model}/requests            {"version", "action", "reason"?, "share"?} -> 202

A request is recorded as a `<action>_requested` ModelEvent on the event path, like the dashboard's buttons
(feedback/dashboard/api.py); the registry's RequestWorker applies it and answers with a row naming the
request (`lineage.request_id`; `history[].request_id` here), or a `request_refused` row with the error.
Mounted by `models_extension(...)` next to `admin_extension` in the process that owns the store.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from feedback.dashboard.api import (
    MAX_BODY,
    MAX_REASON,
    ActionsUnavailable,
    Authenticate,
    _AdminRoute,
    parse_name,
)
from feedback.store import Store
from retrain.lineage import inference_lineage, version_lineage
from retrain.registry import get_version, list_versions
from retrain.requests import REQUESTABLE, request_event
from schemas.errors import InvalidRequest, NotFound, PermissionDenied
from schemas.events import Event

log = logging.getLogger(__name__)


def models_extension(store: Store, authenticate: Authenticate, *,
                     publish: Callable[[Event], None] | None = None) -> Callable[[FastAPI], None]:
    """A gateway HTTP extension adding the registry's admin routes (`publish`: the event sink, for requests)."""
    router = build_models_router(store, authenticate, publish=publish)
    return lambda app: app.include_router(router)


def _json(value: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def build_models_router(store: Store, authenticate: Authenticate, *,
                        publish: Callable[[Event], None] | None = None) -> APIRouter:
    router = APIRouter(route_class=_AdminRoute, tags=["admin", "models"])

    def admin(request: Request) -> Any:
        principal = authenticate(request.headers.get("authorization"))
        if "admin" not in principal.scopes:
            raise PermissionDenied("this key lacks the 'admin' scope "
                                   f"(it has: {', '.join(sorted(principal.scopes))})")
        return principal

    @router.get("/admin/v1/models/{model}/versions")
    async def versions(request: Request, model: str) -> Response:
        admin(request)
        parse_name(model, field="model")
        views = [v for v in await list_versions(store, model) if v.model == model]
        if not views:
            raise NotFound(f"unknown model {model!r} (no versions registered)", param="model")
        active = next((v.version_id for v in views if v.state == "active"), None)
        canary = next((v.version_id for v in views if v.state == "canary"), None)
        return _json({"model": model, "active": active, "canary": canary,
                      "versions": [dataclasses.asdict(v) for v in views]})

    @router.get("/admin/v1/models/{model}/versions/{version}")
    async def version(request: Request, model: str, version: str) -> Response:
        admin(request)
        parse_name(model, field="model")
        parse_name(version, field="version")
        return _json(await version_lineage(store, model, version))

    @router.get("/admin/v1/lineage/{inference_id}")
    async def lineage(request: Request, inference_id: str) -> Response:
        admin(request)
        parse_name(inference_id, field="inference_id")
        return _json(await inference_lineage(store, inference_id))

    @router.post("/admin/v1/models/{model}/requests", status_code=202)
    async def model_request(request: Request, model: str) -> Response:
        principal = admin(request)
        parse_name(model, field="model")
        body = await _body(request)
        if publish is None:
            raise ActionsUnavailable("model actions are off in this process (no event sink)", param="action")
        version_id = parse_name(body.get("version"), field="version")
        if version_id is None:
            raise InvalidRequest("'version' is required", param="version")
        current = await get_version(store, model, version_id)  # NotFound for unknown model/version
        event = request_event(model=model, version_id=version_id, action=body.get("action", ""),
                              actor=principal.key_id, reason=body.get("reason", ""), tenant=principal.tenant,
                              share=body.get("share", 0.0), base_model=current.base_model,
                              adapter_path=current.adapter_path, previous_state=current.state)
        publish(event)
        log.info("model action requested: %s %s@%s by key %s", body.get("action"), model, version_id,
                 principal.key_id)
        return _json({"event_id": event.event_id, "status": "requested", "action": body["action"], "model": model,
                      "version_id": version_id, "state": event.state, "previous_state": current.state}, 202)

    return router


async def _body(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise InvalidRequest(f"the body is larger than {MAX_BODY} bytes", param="body")
    try:
        data = msgspec.json.decode(raw or b"{}")
    except msgspec.DecodeError:
        raise InvalidRequest("the body must be a JSON object", param="body") from None
    if not isinstance(data, dict) or set(data) - {"version", "action", "reason", "share"}:
        raise InvalidRequest("the body may hold only 'version', 'action', 'reason' and 'share'", param="body")
    if data.get("action") not in REQUESTABLE:
        raise InvalidRequest(f"'action' must be one of: {', '.join(REQUESTABLE)}", param="action")
    reason = data.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise InvalidRequest(f"'reason' must be a string of at most {MAX_REASON} characters", param="reason")
    share = data.get("share", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
        raise InvalidRequest("'share' must be a number from 0 to 1 (0: the default share)", param="share")
    if not isinstance(data.get("version"), str):
        raise InvalidRequest("'version' must be a string", param="version")
    return {**data, "share": float(share), "reason": reason}
