"""The routing table of each served model (the active version and an optional canary) and the sticky split.

Pure functions on plain data. `routing_from_events` folds the registry's append-only `ModelEvent` rows into
what each model should serve now: the latest row of each version says its state; the newest version whose
state is `active` is the active arm, the newest in `canary` is the canary arm with its share. Versions whose
latest row is `rolled_back`, `retired`, `rejected` or `candidate` serve nothing. No `active` row: the model
serves its configured base (the caller's default).

Versions are scoped (`ModelEvent.tenant`: '' global, else one tenant's). `routing_from_events` gives the
global routing of each model; `tenant_routings_from_events` gives, per (model, tenant), the routing of the
tenants that have a version of their own (active or canary). A tenant without one is served the global routing.

The canary split is sticky: a request's sticky key (its session, else its end user, else its API key) hashes
with the model name to a point in [0, 1); the request goes to the canary when that point is below the share.
The same key always lands on the same arm, and over many keys the canary's fraction matches the share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from schemas.events import ModelEvent

ArmName = Literal["active", "canary"]
ACTIVE: ArmName = "active"
CANARY: ArmName = "canary"


@dataclass(frozen=True, slots=True)
class Arm:
    """One servable version: its id, and the adapter artifact it needs (empty path: the base model itself)."""

    version: str
    adapter_path: str = ""
    artifact_sha256: str = ""

    @property
    def adapter(self) -> str | None:
        """The name the engine serves the adapter under (the version id), or None for the base model."""
        return self.version if self.adapter_path else None


@dataclass(frozen=True, slots=True)
class ModelRouting:
    """What one model serves: `active` (None: its configured base) and an optional canary with its share."""

    active: Arm | None = None
    canary: Arm | None = None
    canary_share: float = 0.0


def _order(e: ModelEvent) -> tuple[int, str]:
    return e.ts_ms, e.event_id  # event ids are UUIDv7: they break ties within a millisecond in creation order


def routing_from_events(events: Iterable[ModelEvent]) -> dict[str, ModelRouting]:
    """Each model's global routing from its lifecycle rows, in any order (duplicates are harmless).

    The latest row of a version (by ts_ms, then event id) is its state. Among versions in `active`, the one
    that became active last wins (a promotion whose `retired` row for the old version is not written yet
    still switches at once); likewise for `canary`. A canary equal to the active version is dropped.
    Tenant-scoped versions are not part of it (see `tenant_routings_from_events`).
    """
    return {model: r for (model, tenant), r in scoped_routings(events).items() if not tenant}


def tenant_routings_from_events(events: Iterable[ModelEvent]) -> dict[tuple[str, str], ModelRouting]:
    """(model, tenant) -> the routing of each tenant with a version of its own; `active` None: the tenant's
    own canary runs against the global active version."""
    return {key: r for key, r in scoped_routings(events).items() if key[1]}


def scoped_routings(events: Iterable[ModelEvent]) -> dict[tuple[str, str], ModelRouting]:
    """(model, scope) -> routing, by the rules of `routing_from_events` applied within each scope."""
    latest: dict[tuple[str, str], ModelEvent] = {}
    for e in events:
        if not e.model or not e.version_id:
            continue
        key = (e.model, e.version_id)
        seen = latest.get(key)
        if seen is None or _order(e) >= _order(seen):
            latest[key] = e
    active: dict[tuple[str, str], ModelEvent] = {}
    canary: dict[tuple[str, str], ModelEvent] = {}
    for e in latest.values():
        pick = active if e.state == "active" else canary if e.state == "canary" else None
        if pick is None:
            continue
        scope = (e.model, e.tenant)
        held = pick.get(scope)
        if held is None or _order(e) > _order(held):
            pick[scope] = e
    out: dict[tuple[str, str], ModelRouting] = {}
    for key in {*active, *canary}:
        a, c = active.get(key), canary.get(key)
        if c is not None and (c.canary_share <= 0 or (a is not None and a.version_id == c.version_id)):
            c = None
        if a is None and c is None:
            continue
        out[key] = ModelRouting(
            active=_arm(a) if a is not None else None,
            canary=_arm(c) if c is not None else None,
            canary_share=float(c.canary_share) if c is not None else 0.0,
        )
    return out


def _arm(e: ModelEvent) -> Arm:
    return Arm(e.version_id, e.adapter_path, e.artifact_sha256)


def sticky_key(*, session: str = "", user: str = "", key_id: str = "") -> str:
    """What keeps a caller on one arm: the session id, else the end-user id, else the API key."""
    if session:
        return "s:" + session
    if user:
        return "u:" + user
    return "k:" + key_id


def sticky_point(model: str, key: str) -> float:
    """A stable point in [0, 1) for (model, key): 64 bits of BLAKE2b, the same in every process and run."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_arm(model: str, key: str, canary_share: float) -> ArmName:
    """`canary` for the keys whose point falls below the share, `active` for the rest."""
    if canary_share <= 0:
        return ACTIVE
    if canary_share >= 1:
        return CANARY
    return CANARY if sticky_point(model, key) < canary_share else ACTIVE
