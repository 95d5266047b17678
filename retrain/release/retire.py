"""Safe decommission: a version is retired for good only when nothing uses it.

`servoloop models retire VERSION` (the registry action `decommission`) refuses with `version_in_use`
(HTTP 409 / gRPC ALREADY_EXISTS) while any of these holds, and names every use it found:

- a gateway serves it: the registry's routing says so (state `active` of its scope: every gateway serves the
  active version of each (model, tenant), global or a tenant's; see `gateway/canary.py`), or gateways
  answered requests with it recently (`inferences.model_version` within `serving_window_s`, default 15 min:
  a gateway that has not caught up with a promotion yet, or a pinned client);
- a tenant pins it: it is a tenant's own active version (per-tenant scope), so that tenant is routed to it;
- canary traffic uses it: state `canary` with a share.

A retired version's `successor` is the version that superseded it (recorded by the promotion that retired
it), else the active version of its scope. Clients that ask for a decommissioned or retired version get
`version_retired` (HTTP 404 / gRPC NOT_FOUND) naming that successor (`pinned_version_error`).
"""

from __future__ import annotations

import time
from typing import Any

from feedback.store import Store
from retrain.lifecycle import ModelVersion
from retrain.registry import BASE_VERSION, StoreRegistry, current_views, model_rows
from schemas.errors import Conflict, NotFound

SERVING_WINDOW_S = 900.0


class VersionInUse(Conflict):
    """The version is served, pinned by a tenant or in a canary: it cannot be retired yet."""

    code = "version_in_use"


class VersionRetired(NotFound):
    """A client asked for a version that was retired or decommissioned; the message names its successor."""

    code = "version_retired"


async def recent_traffic(store: Store, model: str, version_id: str, since_ms: int) -> dict[str, Any]:
    """Requests answered with `version_id` of `model` since `since_ms`: {"count", "last_ms", "tenants"}."""
    rows = (await store.query("""
        SELECT count() AS n, toUnixTimestamp64Milli(max(ts)) AS last_ms, groupUniqArray(tenant) AS tenants
        FROM inferences FINAL
        WHERE model = {model:String} AND model_version = {version:String}
          AND ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')""",
                                {"model": model, "version": version_id, "since": since_ms})).to_pylist()
    r = rows[0] if rows else {"n": 0, "last_ms": 0, "tenants": []}
    return {"count": int(r["n"]), "last_ms": int(r["last_ms"] or 0) if r["n"] else 0,
            "tenants": sorted(t for t in r["tenants"] if t)}


def uses_of(view: ModelVersion, traffic: dict[str, Any], window_s: float) -> list[str]:
    """Why `view` cannot be retired now (empty: nothing uses it). Pure."""
    uses = []
    scope = f"tenant {view.tenant!r}" if getattr(view, "tenant", "") else "the global scope"
    if view.state == "active":
        uses.append(f"gateways serve it: it is the active version of {scope}"
                    + (f" (tenant {view.tenant!r} pins it)" if getattr(view, "tenant", "") else ""))
    if view.state == "canary":
        uses.append(f"canary traffic uses it ({view.canary_share:.0%} of {scope}'s requests)")
    if traffic.get("count"):
        tenants = traffic.get("tenants") or []
        uses.append(f"gateways answered {traffic['count']} request(s) with it in the last {window_s:g} s "
                    f"(latest {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(traffic['last_ms'] / 1000))} UTC"
                    + (f"; tenants: {', '.join(tenants)}" if tenants else "") + ")")
    return uses


async def retire_version(registry: StoreRegistry, model: str, version_id: str, *, actor: str, reason: str = "",
                         serving_window_s: float = SERVING_WINDOW_S, request_id: str = "") -> ModelVersion:
    """Decommission `version_id` of `model` unless something uses it.

    Raises VersionInUse (details: `uses`, a list of sentences) while served, pinned or in a canary; NotFound for
    an unknown version; IllegalTransition when the state machine forbids it (e.g. already decommissioned).
    """
    view = await registry.get(model, version_id)
    since = registry.clock() - int(serving_window_s * 1000)
    traffic = await recent_traffic(registry.store, model, version_id, since)
    uses = uses_of(view, traffic, serving_window_s)
    if uses:
        raise VersionInUse(f"cannot retire {model}@{version_id}: " + "; ".join(uses),
                           param="version", details={"uses": uses, "state": view.state, "traffic": traffic})
    return await registry.decommission(model, version_id, actor=actor, reason=reason or "retired from service",
                                       evidence={"serving_window_s": serving_window_s, "traffic": traffic},
                                       request_id=request_id)


def successor(view: ModelVersion, views: dict[tuple[str, str], ModelVersion]) -> str:
    """The version that replaces `view`: who superseded it, else the active version of its scope, else base."""
    lineage = view.lineage
    retirement = lineage.get("retirement") if isinstance(lineage.get("retirement"), dict) else {}
    by = retirement.get("superseded_by")
    tenant = getattr(view, "tenant", "")
    if isinstance(by, str) and by:
        nxt = views.get((view.model, by))
        if nxt is None or nxt.state in ("active", "canary"):
            return by
        return successor(nxt, views) if nxt.state in ("retired", "decommissioned") and nxt is not view else by
    active = [v for (m, _), v in views.items() if m == view.model and v.state == "active"
              and getattr(v, "tenant", "") in (tenant, "")]
    active.sort(key=lambda v: (getattr(v, "tenant", "") != tenant, -v.updated_ms))
    return active[0].version_id if active else BASE_VERSION


def pinned_version_error(view: ModelVersion, views: dict[tuple[str, str], ModelVersion]) -> VersionRetired | None:
    """The error for a client pinned to `view`, or None when `view` still serves (active or canary)."""
    if view.state not in ("retired", "decommissioned", "rolled_back", "rejected"):
        return None
    nxt = successor(view, views)
    return VersionRetired(f"version {view.version_id!r} of model {view.model!r} is {view.state} and no longer "
                          f"served; use its successor {nxt!r} (or omit the version for the active one)",
                          param="model", details={"version": view.version_id, "state": view.state,
                                                  "successor": nxt})


async def pinned_version_check(store: Store, model: str, version_id: str) -> VersionRetired | None:
    """`pinned_version_error` for a (model, version) read from the store (None when unknown or serving)."""
    views = current_views(await model_rows(store, model))
    view = views.get((model, version_id))
    return pinned_version_error(view, views) if view is not None else None
