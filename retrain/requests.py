"""Applying requested model actions: `<action>_requested` rows in the store become registry steps.

The dashboard (POST /admin/v1/models/{model}/versions/{version}/{action}) and the canary monitor publish a
`ModelEvent` with state `<action>_requested` (actor: the key id, or `canary-monitor`; `reason`; for a canary,
`canary_share`; for the monitor, its evidence as the row's lineage JSON `{"evidence": {...}}`). Those rows
reach the store through the event path. `RequestWorker` polls the store for requests nobody answered yet and
applies each through the registry.

The answer scheme: a request is handled once some `model_events` row carries its event id as
`lineage.request_id`. The registry writes that key on the row of the step it took (`active`, `canary`, ...);
a request it cannot apply (illegal move, unknown version, bad share) gets a `request_refused` row with the
error as its reason, so nothing is dropped silently. Store errors leave the request unanswered: the next poll
tries again.

Actions: `promote`, `rollback`, `reject`, `canary`, and `approve` (the dashboard's name for sending a
candidate to canary, at the request's `canary_share` or the worker's default share), and `decommission`
(`servoloop models retire`: refused while the version is served, pinned or in a canary; retrain/release/retire.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

from feedback.store import Store
from feedback.store.columns import from_arrow
from retrain.registry import REQUEST_REFUSED, StoreRegistry, parse_lineage
from schemas.errors import InvalidRequest, ServoloopError
from schemas.events import ModelEvent

log = logging.getLogger(__name__)

REQUESTABLE = ("promote", "rollback", "reject", "canary", "approve", "decommission")

_UNANSWERED = """
    SELECT * FROM model_events FINAL
    WHERE endsWith(state, '_requested')
      AND event_id NOT IN (SELECT JSONExtractString(lineage, 'request_id') FROM model_events
                           WHERE JSONExtractString(lineage, 'request_id') != '')
    ORDER BY ts, event_id LIMIT {limit:UInt64}"""


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    request_id: str
    model: str
    version_id: str
    action: str
    applied: bool
    state: str  # the version's new state, or `request_refused`
    message: str = ""


async def unanswered_requests(store: Store, *, limit: int = 100) -> list[ModelEvent]:
    """Requested actions no row answers yet, oldest first."""
    table = await store.query(_UNANSWERED, {"limit": limit})
    return list(from_arrow(ModelEvent, table))  # type: ignore[arg-type]


class RequestWorker:
    """Polls for requested actions every `poll_s` and applies them through `registry` (one at a time)."""

    def __init__(self, registry: StoreRegistry, *, poll_s: float = 1.0, default_canary_share: float = 0.1) -> None:
        self.registry = registry
        self.poll_s = poll_s
        self.default_canary_share = default_canary_share
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> list[RequestOutcome]:
        """Apply every unanswered request once; returns what became of each."""
        outcomes = []
        for request in await unanswered_requests(self.registry.store):
            outcomes.append(await self.apply(request))
        return outcomes

    async def apply(self, request: ModelEvent) -> RequestOutcome:
        """Apply one request; a refused one is recorded (`request_refused`) and reported, never raised."""
        action = request.state.removesuffix("_requested")
        reg, model, version, actor = self.registry, request.model, request.version_id, request.actor or "unknown"
        evidence = parse_lineage(request.lineage).get("evidence")
        evidence = evidence if isinstance(evidence, dict) else None
        reason = request.reason
        rid = request.event_id
        try:
            if action == "promote":
                v = await reg.promote(model, version, actor=actor, reason=reason, evidence=evidence, request_id=rid)
            elif action == "rollback":
                v = await reg.rollback(model, version, actor=actor, reason=reason, evidence=evidence, request_id=rid)
            elif action == "reject":
                v = await reg.reject(model, version, reasons=[reason or f"rejected by {actor}"], actor=actor,
                                     evidence=evidence, request_id=rid)
            elif action in ("canary", "approve"):
                v = await reg.start_canary(model, version, share=request.canary_share or self.default_canary_share,
                                           actor=actor, reason=reason, request_id=rid)
            elif action == "decommission":  # `servoloop models retire`: refused while anything uses the version
                from retrain.release.retire import retire_version

                v = await retire_version(reg, model, version, actor=actor, reason=reason, request_id=rid)
            else:
                raise InvalidRequest(f"unknown action {action!r} (expected one of: {', '.join(REQUESTABLE)})")
        except ServoloopError as e:
            await reg.refuse_request(request, e)
            log.warning("refused %s of %s@%s by %s: %s", action, model, version, actor, e.message)
            return RequestOutcome(rid, model, version, action, False, REQUEST_REFUSED, e.message)
        return RequestOutcome(rid, model, version, action, True, v.state)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="model-request-worker")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                for o in await self.run_once():
                    log.info("model request %s: %s %s@%s -> %s %s", o.request_id, o.action, o.model, o.version_id,
                             o.state, o.message)
            except Exception:  # store down, etc.: the requests stay unanswered and are retried
                log.exception("model request worker: poll failed; retrying")
            await asyncio.sleep(self.poll_s)


def request_event(*, model: str, version_id: str, action: str, actor: str, reason: str = "", tenant: str = "",
                  share: float = 0.0, evidence: dict[str, object] | None = None, base_model: str = "",
                  adapter_path: str = "", previous_state: str = "") -> ModelEvent:
    """The `ModelEvent` asking for `action` (what the dashboard and the canary monitor publish)."""
    if action not in REQUESTABLE:
        raise InvalidRequest(f"unknown action {action!r} (expected one of: {', '.join(REQUESTABLE)})", param="action")
    return ModelEvent(tenant=tenant, model=model, version_id=version_id, base_model=base_model,
                      adapter_path=adapter_path, state=f"{action}_requested", previous_state=previous_state,
                      reason=reason or f"{actor} requested {action}", actor=actor, canary_share=share,
                      lineage=json.dumps({"evidence": evidence}) if evidence else "{}")
