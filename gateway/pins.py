"""Version pins: a client may ask for one version of a model as `model@version` (e.g. `chat@v20261123-…`).

A pinned request is served by that version while it serves (the model's or the caller's tenant's active or
canary route). A version that stopped serving (retired, decommissioned, rolled back, rejected) answers
`version_retired` (HTTP 404 / gRPC NOT_FOUND) naming its successor: the version that superseded it (the
promotion that retired it records it), else the active version of its scope, else `base`. A version the
gateway never heard of is `version_not_found`. Pure functions on the registry's `ModelEvent` rows; the hot-swap
watcher hands the folded states to the router (`Router.versions`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from schemas.errors import NotFound
from schemas.events import ModelEvent

SERVING = frozenset({"active", "canary"})
_LIFECYCLE = frozenset({"candidate", "canary", "active", "retired", "rejected", "rolled_back", "decommissioned"})


class VersionRetired(NotFound):
    """The pinned version no longer serves; the message and `details.successor` name what replaced it."""

    code = "version_retired"


class VersionNotFound(NotFound):
    code = "version_not_found"


@dataclass(frozen=True, slots=True)
class PinnedState:
    """A version's current lifecycle state, its scope, and its successor when it no longer serves."""

    state: str
    tenant: str = ""
    successor: str = ""


def split_pinned(model: str, served: Iterable[str]) -> tuple[str, str | None]:
    """(`name`, `version`) for `name@version` when `name` is a served model (and the whole string is not); else
    (model, None)."""
    names = set(served)
    if model in names or "@" not in model:
        return model, None
    name, _, version = model.rpartition("@")
    return (name, version) if name in names and version else (model, None)


def pinned_states(events: Iterable[ModelEvent]) -> dict[tuple[str, str], PinnedState]:
    """(model, version) -> its state now (latest lifecycle row) and, if it no longer serves, its successor."""
    latest: dict[tuple[str, str], ModelEvent] = {}
    for e in events:
        if not e.model or not e.version_id or e.state not in _LIFECYCLE:
            continue
        key = (e.model, e.version_id)
        seen = latest.get(key)
        if seen is None or (e.ts_ms, e.event_id) >= (seen.ts_ms, seen.event_id):
            latest[key] = e
    active: dict[tuple[str, str], ModelEvent] = {}
    for e in latest.values():
        scope = (e.model, e.tenant)
        if e.state == "active" and (scope not in active or (e.ts_ms, e.event_id) > (active[scope].ts_ms,
                                                                                 active[scope].event_id)):
            active[scope] = e
    out: dict[tuple[str, str], PinnedState] = {}
    for (model, version), e in latest.items():
        successor = ""
        if e.state not in SERVING:
            successor = _superseded_by(e)
            if not successor or latest.get((model, successor), e).state not in SERVING:
                now = active.get((model, e.tenant)) or active.get((model, ""))
                successor = now.version_id if now is not None else "base"
        out[(model, version)] = PinnedState(e.state, e.tenant, successor)
    return out


def _superseded_by(e: ModelEvent) -> str:
    try:
        lineage = json.loads(e.lineage) if e.lineage else {}
    except ValueError:
        return ""
    retirement = lineage.get("retirement") if isinstance(lineage, dict) else None
    by = retirement.get("superseded_by") if isinstance(retirement, dict) else None
    return by if isinstance(by, str) else ""


def not_served_error(model: str, version: str, state: PinnedState | None) -> NotFound:
    """The error for a request pinned to `model@version` that no route serves."""
    if state is None:
        return VersionNotFound(f"model {model!r} has no version {version!r}", param="model",
                               details={"model": model, "version": version})
    if state.state in SERVING:  # serving, but not to this caller (another tenant's) or not loaded here yet
        return VersionNotFound(f"version {version!r} of model {model!r} is not served to this key", param="model",
                               details={"model": model, "version": version})
    return VersionRetired(f"version {version!r} of model {model!r} is {state.state} and no longer served; use its "
                          f"successor {model}@{state.successor} (or {model!r} for the active version)", param="model",
                          details={"model": model, "version": version, "state": state.state,
                                   "successor": state.successor})
