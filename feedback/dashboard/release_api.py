"""The release admin API (admin scope): a version's model card, its recorded exports, and a changelog.

    GET /admin/v1/models/{model}/versions/{version}/card       Markdown (`?format=json`: markdown, url, exports)
    GET /admin/v1/models/{model}/changelog?from=A&to=B          what changed from A to B (data, recipe, metrics)

The card is generated from the registry on every read (never stale) and stored beside the artifacts
(`<root>/<model>/_release/<version>/MODEL_CARD.md`) when they are there. A tenant-bound key reads only its tenant's and the
global versions, as in `models_api.py`. Mounted with the registry's routes (`release_extension`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from feedback.dashboard.api import OPERATOR_TENANTS, Authenticate, _AdminRoute, _json, parse_name
from feedback.store import Store
from retrain.lineage import version_lineage
from retrain.release.cards import render_card, write_card
from retrain.release.changelog import changelog
from retrain.release.records import exists, export_records
from schemas.errors import InvalidRequest, PermissionDenied

log = logging.getLogger(__name__)

OPERATORS = OPERATOR_TENANTS


def release_extension(store: Store, authenticate: Authenticate, *,
                      operator_tenants: Collection[str] = OPERATORS) -> Callable[[FastAPI], None]:
    """A gateway HTTP extension adding the release routes (card, changelog)."""
    router = build_release_router(store, authenticate, operator_tenants=operator_tenants)
    return lambda app: app.include_router(router)


def build_release_router(store: Store, authenticate: Authenticate, *,
                         operator_tenants: Collection[str] = OPERATORS) -> APIRouter:
    router = APIRouter(route_class=_AdminRoute, tags=["admin", "models"])

    async def readable(request: Request, model: str, version: str) -> dict[str, Any]:
        principal = authenticate(request.headers.get("authorization"))
        if "admin" not in principal.scopes:
            raise PermissionDenied("this key lacks the 'admin' scope "
                                   f"(it has: {', '.join(sorted(principal.scopes))})")
        parse_name(model, field="model")
        parse_name(version, field="version")
        v = await version_lineage(store, model, version)  # NotFound for unknown model/version
        own = None if principal.tenant in operator_tenants else principal.tenant
        tenant = (v.get("lineage") or {}).get("tenant") or ""
        if own is not None and tenant not in ("", own):
            raise PermissionDenied(f"version {version!r} of model {model!r} belongs to another tenant", param="version")
        return v

    @router.get("/admin/v1/models/{model}/versions/{version}/card")
    async def card(request: Request, model: str, version: str) -> Response:
        v = await readable(request, model, version)
        fmt = request.query_params.get("format", "markdown")
        if fmt not in ("markdown", "json"):
            raise InvalidRequest("'format' must be markdown or json", param="format")
        exports = await asyncio.to_thread(export_records, v["adapter_path"], version) if v["adapter_path"] else []
        url = None
        if v["adapter_path"] and await asyncio.to_thread(exists, v["adapter_path"]):
            try:
                url, text = await asyncio.to_thread(write_card, v, exports)
            except OSError as e:  # the artifact store is read-only or gone: still answer with the card
                log.warning("model card of %s@%s not stored: %s", model, version, e)
                text = render_card(v, exports)
        else:
            text = render_card(v, exports)
        if fmt == "json":
            return _json({"model": model, "version_id": version, "markdown": text, "url": url, "exports": exports})
        return Response(text, media_type="text/markdown; charset=utf-8", headers={"Cache-Control": "no-store"})

    @router.get("/admin/v1/models/{model}/changelog")
    async def changes(request: Request, model: str) -> Response:
        a, b = request.query_params.get("from"), request.query_params.get("to")
        if not a or not b:
            raise InvalidRequest("give the two versions: ?from=A&to=B", param="from" if not a else "to")
        return _json(changelog(await readable(request, model, a), await readable(request, model, b)))

    return router
