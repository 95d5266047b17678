"""Model version lifecycle: the states, the legal transitions, and the `Registry` seam.

A version is born `candidate` (a trained adapter that passed nothing yet). The evaluation gate turns it
into `rejected` (with reasons) or leaves it a candidate; an operator or policy sends it to `canary` (a share
of traffic) and then `active` (all traffic; the previous active version becomes `retired`), or rolls it
back (`rolled_back`). Rolling back the active version re-activates the version that was active before it.
Every step is one append-only `ModelEvent` row; the current state of a version is its latest row.

A version has a scope, fixed at registration: global (tenant '') or one tenant's. Each scope of a model has
its own active version and its own canary; a tenant without an active version of its own is served the
global one.

    candidate ──▶ canary ──▶ active ──▶ retired
        │            │          │
        ▼            ▼          ▼
     rejected    rolled_back  rolled_back      (and candidate ──▶ active: a manual promote)

A version that no longer serves (candidate, retired, rejected, rolled_back) can be `decommissioned`
(`servoloop models retire`, retrain/release/retire.py): final, never served again, its artifacts only archived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from schemas.errors import Conflict

State = Literal["candidate", "canary", "active", "retired", "rejected", "rolled_back", "decommissioned"]
Action = Literal["canary", "promote", "rollback", "reject", "retire", "decommission"]

STATES: tuple[State, ...] = ("candidate", "canary", "active", "retired", "rejected", "rolled_back", "decommissioned")
TERMINAL: frozenset[State] = frozenset({"retired", "rejected", "rolled_back", "decommissioned"})

# action -> {from state: to state}
TRANSITIONS: dict[Action, dict[State, State]] = {
    "canary": {"candidate": "canary"},
    "promote": {"candidate": "active", "canary": "active"},
    "rollback": {"canary": "rolled_back", "active": "rolled_back"},
    "reject": {"candidate": "rejected"},
    "retire": {"active": "retired"},
    "decommission": {"candidate": "decommissioned", "retired": "decommissioned", "rejected": "decommissioned",
                     "rolled_back": "decommissioned"},
}


class IllegalTransition(Conflict):
    """The action does not apply to the version's current state (e.g. promoting a rejected version)."""

    code = "illegal_transition"


def next_state(current: State, action: Action) -> State:
    """The state `action` leads to from `current`; raises IllegalTransition naming what is allowed."""
    allowed = TRANSITIONS.get(action)
    if allowed is None:
        raise IllegalTransition(f"unknown action {action!r}; actions: {', '.join(TRANSITIONS)}")
    to = allowed.get(current)
    if to is None:
        can = [a for a, m in TRANSITIONS.items() if current in m]
        raise IllegalTransition(
            f"cannot {action} a version in state {current!r} (it can be: {', '.join(can) or 'nothing, it is final'})",
            details={"state": current, "action": action, "allowed": can})
    return to


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A version as its latest `ModelEvent` row says it is. `adapter_path` is empty for the base model."""

    model: str
    version_id: str
    state: State
    base_model: str
    adapter_path: str = ""
    artifact_sha256: str = ""
    canary_share: float = 0.0
    lineage: dict[str, Any] = field(default_factory=dict)
    updated_ms: int = 0
    actor: str = ""
    reason: str = ""
    tenant: str = ""  # the version's scope: '' = global (every tenant's fallback), else the one tenant it serves


@runtime_checkable
class Registry(Protocol):
    """Versions of each model and their lifecycle. Every method appends one or more `ModelEvent`s and returns
    the version's new view; illegal moves raise IllegalTransition, unknown versions NotFound."""

    async def register_candidate(self, *, model: str, base_model: str, adapter_dir: Path, lineage: dict[str, Any],
                                 actor: str, version_id: str | None = None, tenant: str = "") -> ModelVersion:
        """Copy the adapter into the artifact store (hashing it) and record a `candidate` of scope `tenant`."""
        ...

    async def reject(self, model: str, version_id: str, *, reasons: list[str], actor: str,
                     evidence: dict[str, Any] | None = None) -> ModelVersion: ...

    async def start_canary(self, model: str, version_id: str, *, share: float, actor: str,
                           reason: str = "") -> ModelVersion: ...

    async def promote(self, model: str, version_id: str, *, actor: str, reason: str = "",
                      evidence: dict[str, Any] | None = None) -> ModelVersion: ...

    async def rollback(self, model: str, version_id: str, *, actor: str, reason: str = "",
                       evidence: dict[str, Any] | None = None) -> ModelVersion: ...

    async def get(self, model: str, version_id: str) -> ModelVersion: ...

    async def versions(self, model: str | None = None) -> list[ModelVersion]: ...

    async def active(self, model: str, tenant: str = "") -> ModelVersion | None: ...
