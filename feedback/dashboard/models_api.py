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

Tenants: versions are global or one tenant's (`ModelVersion.tenant`). Admin keys of `operator_tenants` see
every version and may narrow a listing with `?tenant=T` (T's versions and the global ones it falls back to).
Any other admin key is tenant-scoped: it lists and reads only its own tenant's versions and the global ones
(naming another tenant, or reading another tenant's version, is 403), reads lineage without other tenants'
feedback, and requests actions only on its own tenant's versions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from feedback.dashboard.api import (
    MAX_REASON,
    OPERATOR_TENANTS,
    ActionsUnavailable,
    Authenticate,
    _AdminRoute,
    _json,
    json_body,
    parse_name,
)
from feedback.store import Store
from retrain.lifecycle import ModelVersion
from retrain.lineage import inference_lineage, source_feedback, version_lineage
from retrain.registry import get_version, list_versions, served_versions
from retrain.requests import REQUESTABLE, request_event
from schemas.errors import InvalidRequest, NotFound, PermissionDenied
from schemas.events import Event

log = logging.getLogger(__name__)


class OtherTenant(PermissionDenied):
    """A tenant-scoped key asked for another tenant's versions (or to change a global one)."""

    code = "other_tenant"


OPERATORS = OPERATOR_TENANTS


def models_extension(store: Store, authenticate: Authenticate, *, publish: Callable[[Event], None] | None = None,
                     operator_tenants: Collection[str] = OPERATORS) -> Callable[[FastAPI], None]:
    """A gateway HTTP extension adding the registry's admin routes (`publish`: the event sink, for requests)."""
    router = build_models_router(store, authenticate, publish=publish, operator_tenants=operator_tenants)
    return lambda app: app.include_router(router)


def build_models_router(store: Store, authenticate: Authenticate, *, publish: Callable[[Event], None] | None = None,
                        operator_tenants: Collection[str] = OPERATORS) -> APIRouter:
    router = APIRouter(route_class=_AdminRoute, tags=["admin", "models"])

    def scope(principal: Any) -> str | None:
        """None for an operator's key (every tenant), else the one tenant the key is bound to."""
        return None if principal.tenant in operator_tenants else principal.tenant

    def check_readable(principal: Any, v: ModelVersion) -> None:
        own = scope(principal)
        if own is not None and v.tenant not in ("", own):
            raise OtherTenant(f"version {v.version_id!r} of model {v.model!r} belongs to another tenant; this "
                                   f"key reads only its own tenant's ({own!r}) and the global versions",
                                   param="version")

    def admin(request: Request) -> Any:
        principal = authenticate(request.headers.get("authorization"))
        if "admin" not in principal.scopes:
            raise PermissionDenied("this key lacks the 'admin' scope "
                                   f"(it has: {', '.join(sorted(principal.scopes))})")
        return principal

    @router.get("/admin/v1/models/{model}/versions")
    async def versions(request: Request, model: str) -> Response:
        principal = admin(request)
        parse_name(model, field="model")
        if set(request.query_params) - {"tenant"}:
            raise InvalidRequest("the only query parameter is 'tenant'", param="tenant")
        wanted = parse_name(request.query_params.get("tenant"), field="tenant")
        own = scope(principal)
        if own is not None:
            if wanted is not None and wanted != own:
                raise OtherTenant(f"this key sees only its own tenant ({own!r})", param="tenant")
            wanted = own
        views = [v for v in await list_versions(store, model, wanted, with_global=True) if v.model == model]
        if not views:
            raise NotFound(f"unknown model {model!r} (no versions registered)", param="model")
        return _json({"model": model, "tenant": wanted, **served_versions(views, wanted),
                      "versions": [dataclasses.asdict(v) for v in views]})

    @router.get("/admin/v1/models/{model}/versions/{version}")
    async def version(request: Request, model: str, version: str) -> Response:
        principal = admin(request)
        parse_name(model, field="model")
        parse_name(version, field="version")
        check_readable(principal, await get_version(store, model, version))
        out = await version_lineage(store, model, version)
        return _json(await own_feedback_only(store, out, scope(principal)))

    @router.get("/admin/v1/lineage/{inference_id}")
    async def lineage(request: Request, inference_id: str) -> Response:
        principal = admin(request)
        parse_name(inference_id, field="inference_id")
        out = await inference_lineage(store, inference_id)
        own = scope(principal)
        if own is not None and out["inference"].get("tenant") != own:  # as if unknown: ids of others stay private
            raise NotFound(f"no inference {inference_id!r}", param="inference_id")
        if out.get("version") is not None:
            out["version"] = await own_feedback_only(store, out["version"], own)
        return _json(out)

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
        own = scope(principal)
        if own is not None and current.tenant != own:
            raise OtherTenant(f"this key acts only on its own tenant's ({own!r}) versions; {version_id!r} is "
                                   + ("another tenant's" if current.tenant else "global (an operator's to change)"),
                                   param="version")
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


async def own_feedback_only(store: Store, lineage: dict[str, Any], tenant: str | None) -> dict[str, Any]:
    """A version's lineage as a tenant-scoped key may read it: feedback rows and ids of its own tenant only."""
    if tenant is None:
        return lineage
    dataset = lineage.get("dataset") or {}
    if dataset and dataset.get("tenant") != tenant:  # a global version: others' feedback trained it too
        mine = {**dataset, "tenant": tenant}
        mine.pop("feedback_ids", None)
        model, parent = lineage["model"], str((lineage.get("lineage") or {}).get("parent_version") or "")
        feedback = await source_feedback(store, model, mine, parent_version=parent if parent != "base" else "")
        inner = {**(lineage.get("lineage") or {}), "dataset": mine}
        return {**lineage, "dataset": mine, "lineage": inner, "feedback": feedback}
    return lineage


async def _body(request: Request) -> dict[str, Any]:
    data = await json_body(request)
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
