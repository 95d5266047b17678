"""Spend budgets over the admin API: read what is in force, and set one (recorded as a `BudgetEvent`).

    GET  /admin/v1/budgets[?tenant=T]   budgets in force, each with this period's spend, state and reset time
    POST /admin/v1/budgets              {"scope": "tenant"|"key", "subject", "period": "day"|"month",
                                         "soft_usd", "hard_usd", "tenant"?, "reason"?} -> 202 (admin scope)

A budget is an append-only row on the event path (like a model action request): the store keeps every
change, the latest per (scope, subject, period) is in force, and every gateway picks it up at its next
poll of the store (`gateway.budgets.poll_interval_s`). Both limits 0 clears a budget. Reads follow the
dashboard's rule (an operator's admin key sees every tenant, another admin key only its own); only an
operator's key sets budgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from feedback.budgets import budget_status
from feedback.dashboard.api import (
    MAX_REASON,
    OPERATOR_TENANTS,
    ActionsUnavailable,
    Authenticate,
    _AdminRoute,
    _json,
    is_operator,
    json_body,
    parse_name,
    require_admin,
    visible_tenant,
)
from feedback.store import Store
from schemas.errors import InvalidRequest, PermissionDenied
from schemas.events import BudgetEvent, Event

MAX_USD = 1e12
_FIELDS = {"scope", "subject", "period", "soft_usd", "hard_usd", "tenant", "reason"}


def budgets_extension(store: Store, authenticate: Authenticate, *, publish: Callable[[Event], None] | None = None,
                      operator_tenants: Collection[str] = OPERATOR_TENANTS) -> Callable[[FastAPI], None]:
    """A gateway HTTP extension adding the budget routes (`publish`: the event sink, for setting budgets)."""
    router = build_budgets_router(store, authenticate, publish=publish, operator_tenants=operator_tenants)
    return lambda app: app.include_router(router)


def parse_budget(data: object) -> dict[str, Any]:
    """The fields of a budget request body, checked. Raises InvalidRequest naming the field."""
    if not isinstance(data, dict) or set(data) - _FIELDS:
        raise InvalidRequest(f"the body must be a JSON object with only: {', '.join(sorted(_FIELDS))}", param="body")
    scope = data.get("scope", "tenant")
    if scope not in ("tenant", "key"):
        raise InvalidRequest("'scope' must be 'tenant' or 'key'", param="scope")
    subject = parse_name(data.get("subject") if isinstance(data.get("subject"), str) else None, field="subject")
    if subject is None:
        raise InvalidRequest("'subject' (the tenant name or the key id) is required", param="subject")
    period = data.get("period", "day")
    if period not in ("day", "month"):
        raise InvalidRequest("'period' must be 'day' or 'month'", param="period")
    limits = {}
    for name in ("soft_usd", "hard_usd"):
        value = data.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_USD:
            raise InvalidRequest(f"'{name}' must be a number from 0 to {MAX_USD:g} (0: no such limit)", param=name)
        limits[name] = float(value)
    if limits["soft_usd"] and limits["hard_usd"] and limits["soft_usd"] > limits["hard_usd"]:
        raise InvalidRequest("'soft_usd' must not exceed 'hard_usd'", param="soft_usd")
    tenant = data.get("tenant", subject if scope == "tenant" else "")
    if not isinstance(tenant, str) or (tenant and parse_name(tenant, field="tenant") is None):
        raise InvalidRequest("'tenant' must be a tenant name", param="tenant")
    if scope == "tenant" and tenant != subject:
        raise InvalidRequest("a tenant budget's 'tenant' is its 'subject'", param="tenant")
    reason = data.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise InvalidRequest(f"'reason' must be a string of at most {MAX_REASON} characters", param="reason")
    return {"scope": scope, "subject": subject, "period": period, "tenant": tenant, "reason": reason, **limits}


def build_budgets_router(store: Store, authenticate: Authenticate, *, publish: Callable[[Event], None] | None = None,
                         operator_tenants: Collection[str] = OPERATOR_TENANTS) -> APIRouter:
    router = APIRouter(route_class=_AdminRoute, tags=["admin", "budgets"])

    @router.get("/admin/v1/budgets")
    async def show(request: Request) -> Response:
        unknown = sorted(set(request.query_params) - {"tenant"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter '{unknown[0]}' (expected: tenant)", param=unknown[0])
        tenant = visible_tenant(require_admin(authenticate, request), request.query_params.get("tenant"),
                                operator_tenants)
        now_ms = time.time_ns() // 1_000_000
        return _json({"server_time_ms": now_ms, "tenant": tenant,
                      "budgets": await budget_status(store, now_ms / 1000, tenant=tenant)})

    @router.post("/admin/v1/budgets", status_code=202)
    async def set_budget(request: Request) -> Response:
        principal = require_admin(authenticate, request)
        if not is_operator(principal, operator_tenants):
            raise PermissionDenied(f"only an operator's admin key (tenant {', '.join(sorted(operator_tenants))}) "
                                   "sets budgets")
        fields = parse_budget(await json_body(request))
        if publish is None:
            raise ActionsUnavailable("budgets cannot be set in this process (no event sink)", param="body")
        event = BudgetEvent(actor=principal.key_id, **fields)
        publish(event)
        return _json({"event_id": event.event_id, "status": "recorded", **fields,
                      "note": "gateways apply it at their next poll of the store"}, 202)

    return router
