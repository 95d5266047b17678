"""The canary monitor: a version in `canary` against the active arm, and the decision to promote or roll back.

    report = await run_canary(store, policy.canary, now_ms=now, state=state)   # runner.run_cycle calls this

For every model whose registry has a version in `canary` (its latest lifecycle row, operator requests
aside), both arms are measured over the canary's lifetime (since its `canary` row): requests, error,
guardrail block and redact rates, latency p95, thumbs-up rate and mean rating (each inference's latest
feedback of that kind), and head-to-head preferences between the arms. `decide_canary` (pure) turns the
two arms and the policy into `wait`, `promote` or `rollback` (feedback/monitors/canary_decision.py).

The canary arm is every inference of the canary version; the active arm every other inference of the
model the gateway stamped `canary_arm = 'active'` or that the active version served. Each decision is one
`MonitorResult` (monitor `canary`, metric `canary_decision`, value 1 promote / 0 wait / -1 rollback, the
evidence in `details`). With `auto_promote` / `auto_rollback` on, a decision also becomes one
`ModelEvent(state="promote_requested" | "rollback_requested", actor="canary-monitor")`, the same request
the dashboard's model actions make, which the registry acts on. A request is made once per canary: not
when the store already holds one since the canary started (a rollback request also blocks a later
promote request), nor when this process made it in an earlier cycle (`state`, for events still on their
way through Kafka).

Repeated looks: the decision is re-tested every cycle on growing data, which raises the chance that noise
crosses `alpha` at some look; `min_samples`/`min_feedback` and the margins keep that practical. A true
sequential test (alpha spending over the canary's looks) would be the next step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from feedback.monitors.alerts import Alert
from feedback.monitors.base import GroupKey
from feedback.monitors.canary_decision import Action, ArmStats, CanaryDecision, Check, decide_canary
from feedback.monitors.policy import CanaryPolicy

__all__ = ["ACTOR", "MONITOR", "ArmStats", "CanaryDecision", "CanaryReport", "CanaryVersion", "Check", "arm_stats",
           "canary_versions", "decide_canary", "run_canary"]
from feedback.monitors.stats import AlertState
from feedback.store.base import Store
from schemas.events import ModelEvent, MonitorResult

log = logging.getLogger(__name__)

MONITOR = "canary"
METRIC = "canary_decision"
ACTOR = "canary-monitor"
REQUESTS = {"promote": "promote_requested", "rollback": "rollback_requested"}
_CODE = {"promote": 1.0, "wait": 0.0, "rollback": -1.0}


# -- the registry's canaries and their arms (store reads) -------------------------------------------------------------


class CanaryVersion(msgspec.Struct, frozen=True, kw_only=True):
    """A version in `canary` now, since when, the model's active version, and the requests made since."""

    model: str
    version_id: str
    tenant: str
    since_ms: int
    active_version: str
    base_model: str = ""
    adapter_path: str = ""
    artifact_sha256: str = ""
    canary_share: float = 0.0
    requested: tuple[str, ...] = ()  # actions (promote, rollback) already requested since `since_ms`


# Rows that ask for or answer a request (the dashboard's and this monitor's `<action>_requested`, the
# registry's `request_refused`) are not lifecycle states: a version's state is its latest other row.
_REQUEST_ROW = "(endsWith(state, '_requested') OR state = 'request_refused')"
BASE_VERSION = "base"
"""The registry's implicit version (the base model, no adapter): the active arm while no adapter is active."""

_VERSIONS_SQL = f"""
    SELECT model, version_id,
           argMaxIf(state, (ts, event_id), NOT {_REQUEST_ROW}) AS current_state,
           toUnixTimestamp64Milli(maxIf(ts, state = 'canary')) AS since_ms,
           argMaxIf(tenant, (ts, event_id), state = 'canary') AS canary_tenant,
           argMaxIf(base_model, (ts, event_id), state = 'canary') AS canary_base_model,
           argMaxIf(adapter_path, (ts, event_id), state = 'canary') AS canary_adapter_path,
           argMaxIf(artifact_sha256, (ts, event_id), state = 'canary') AS canary_sha256,
           argMaxIf(canary_share, (ts, event_id), state = 'canary') AS share,
           toUnixTimestamp64Milli(maxIf(ts, NOT {_REQUEST_ROW})) AS changed_ms,
           groupArrayIf(state, endsWith(state, '_requested')) AS request_states,
           groupArrayIf(toUnixTimestamp64Milli(ts), endsWith(state, '_requested')) AS request_ms
    FROM model_events FINAL
    WHERE ts <= fromUnixTimestamp64Milli({{now:Int64}}, 'UTC')
    GROUP BY model, version_id"""


async def canary_versions(store: Store, *, now_ms: int) -> list[CanaryVersion]:
    """Every version whose current state (its latest lifecycle row up to `now_ms`) is `canary`, by model."""
    rows = (await store.query(_VERSIONS_SQL, {"now": now_ms})).to_pylist()
    active: dict[str, tuple[int, str]] = {}
    for r in rows:
        if r["current_state"] == "active" and r["changed_ms"] >= active.get(r["model"], (-1, ""))[0]:
            active[r["model"]] = (r["changed_ms"], r["version_id"])
    out = []
    for r in rows:
        if r["current_state"] != "canary":
            continue
        since = int(r["since_ms"])
        requested = sorted({s.removesuffix("_requested") for s, ts in zip(r["request_states"], r["request_ms"], strict=True)
                            if ts >= since})
        out.append(CanaryVersion(model=r["model"], version_id=r["version_id"], tenant=r["canary_tenant"],
                                 since_ms=since, active_version=active.get(r["model"], (0, BASE_VERSION))[1],
                                 base_model=r["canary_base_model"], adapter_path=r["canary_adapter_path"],
                                 artifact_sha256=r["canary_sha256"], canary_share=float(r["share"]),
                                 requested=tuple(requested)))
    return sorted(out, key=lambda c: (c.model, c.version_id))


_ARMS = """
    w AS (
        SELECT event_id, tenant, if(model_version = {canary:String}, 'canary', 'active') AS arm, status,
               input_action, output_action, latency_ms, cityHash64(tenant, event_id) AS fb_key
        FROM inferences FINAL
        WHERE model = {model:String} AND NOT shadow
          AND ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC') AND ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')
          AND (model_version = {canary:String} OR canary_arm = 'active'
               OR ({active:String} != '' AND model_version = {active:String}))
    )"""

_ARM_SQL = f"""
    WITH {_ARMS},
    fb AS (
        SELECT cityHash64(tenant, target_id) AS fb_key,
               countIf(kind = 'thumbs' AND thumbs IS NOT NULL) > 0 AS has_thumbs,
               argMaxIf(assumeNotNull(thumbs), ts, kind = 'thumbs' AND thumbs IS NOT NULL) AS up,
               countIf(kind = 'rating' AND rating IS NOT NULL) > 0 AS has_rating,
               argMaxIf(assumeNotNull(rating), ts, kind = 'rating' AND rating IS NOT NULL) AS last_rating
        FROM feedback FINAL
        WHERE kind IN ('thumbs', 'rating') AND ts < fromUnixTimestamp64Milli({{until:Int64}}, 'UTC')
          AND target_id IN (SELECT event_id FROM w)
        GROUP BY fb_key
    )
    SELECT w.arm AS arm, count() AS requests, countIf(w.status = 'error') AS errors,
           countIf(w.status = 'blocked' OR w.input_action = 'block' OR w.output_action = 'block') AS blocked,
           countIf(w.input_action = 'redact' OR w.output_action = 'redact') AS redacted,
           quantileExactIf(0.95)(w.latency_ms, w.status != 'blocked') AS latency_p95_ms,
           countIf(w.status != 'blocked') AS n_lat,
           countIf(fb.has_thumbs) AS thumbs_n, countIf(fb.has_thumbs AND fb.up) AS thumbs_up,
           countIf(fb.has_rating) AS rating_n, avgIf(fb.last_rating, fb.has_rating) AS rating_mean,
           varSampIf(fb.last_rating, fb.has_rating) AS rating_var
    FROM w ANY LEFT JOIN fb ON fb.fb_key = w.fb_key
    GROUP BY arm"""

_PREFERENCE_SQL = f"""
    WITH {_ARMS},
    p AS (
        SELECT tenant, preferred_id, other_id FROM feedback FINAL
        WHERE kind = 'preference'
          AND ts >= fromUnixTimestamp64Milli({{since:Int64}}, 'UTC') AND ts < fromUnixTimestamp64Milli({{until:Int64}}, 'UTC')
        ORDER BY ts, event_id
        LIMIT 1 BY tenant, if(idempotency_key = '', event_id, idempotency_key)
    )
    SELECT countIf(a.arm = 'canary') AS wins, count() AS comparisons
    FROM p
    INNER JOIN w AS a ON a.event_id = p.preferred_id AND a.tenant = p.tenant
    INNER JOIN w AS b ON b.event_id = p.other_id AND b.tenant = p.tenant
    WHERE a.arm != b.arm"""


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


async def arm_stats(store: Store, canary: CanaryVersion, *, now_ms: int) -> tuple[ArmStats, ArmStats]:
    """(canary arm, active arm) over `[canary.since_ms, now_ms)`. Two queries; raises what the store raises."""
    params = {"model": canary.model, "canary": canary.version_id, "active": canary.active_version,
              "since": canary.since_ms, "until": now_ms}
    rows = {r["arm"]: r for r in (await store.query(_ARM_SQL, params)).to_pylist()}
    [pref] = (await store.query(_PREFERENCE_SQL, params)).to_pylist() or [{"wins": 0, "comparisons": 0}]
    arms = []
    for arm in ("canary", "active"):
        r = rows.get(arm)
        if r is None:
            arms.append(ArmStats())
            continue
        rated = int(r["rating_n"]) > 0
        wins = int(pref["wins"]) if arm == "canary" else int(pref["comparisons"]) - int(pref["wins"])
        arms.append(ArmStats(
            requests=int(r["requests"]), errors=int(r["errors"]), blocked=int(r["blocked"]),
            redacted=int(r["redacted"]), latency_p95_ms=_finite(r["latency_p95_ms"]) if r["n_lat"] else None,
            thumbs_n=int(r["thumbs_n"]), thumbs_up=int(r["thumbs_up"]), rating_n=int(r["rating_n"]),
            rating_mean=_finite(r["rating_mean"]) if rated else None,
            rating_var=_finite(r["rating_var"]) if rated else None,
            wins=wins, comparisons=int(pref["comparisons"])))
    return arms[0], arms[1]


# -- one canary pass: results and requests ----------------------------------------------------------------------------


@dataclass
class CanaryReport:
    results: list[MonitorResult] = field(default_factory=list)
    requests: list[ModelEvent] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)  # one per request made, for the webhook
    decisions: dict[tuple[str, str], CanaryDecision] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def request_key(model: str, version_id: str, action: str) -> tuple[str, GroupKey]:
    """The runner-state key remembering that this process requested `action` for a canary."""
    return f"{MONITOR}:{action}", GroupKey(model=model, model_version=version_id)


def arm_summary(arm: ArmStats) -> dict[str, Any]:
    return {**msgspec.to_builtins(arm), **arm.rates()}


def _skip_reason(action: Action, version: CanaryVersion, policy: CanaryPolicy,
                 state: Mapping[tuple[str, GroupKey], AlertState]) -> str | None:
    if action == "wait":
        return None
    if not (policy.auto_promote if action == "promote" else policy.auto_rollback):
        return f"auto_{action} is off: recommendation only"
    blocking = {"promote": ("promote", "rollback"), "rollback": ("rollback",)}[action]
    earlier = [a for a in blocking if a in version.requested
               or request_key(version.model, version.version_id, a) in state]
    if earlier:
        return f"{earlier[0]} already requested for this canary"
    return None


async def run_canary(store: Store, policy: CanaryPolicy, *, now_ms: int,
                     state: dict[tuple[str, GroupKey], AlertState]) -> CanaryReport:
    """Decide every canary at `now_ms`: one MonitorResult each, and a ModelEvent request where the policy acts.

    Records the requests it makes in `state` (the runner's alert state). A canary whose reads fail is
    reported in `errors` and skipped; a failing registry read raises.
    """
    report = CanaryReport()
    if not policy.enabled:
        return report
    for version in await canary_versions(store, now_ms=now_ms):
        label = f"{MONITOR}:{version.model}@{version.version_id}"
        try:
            canary, active = await arm_stats(store, version, now_ms=now_ms)
        except Exception as e:  # one canary's failing read must not stop the others
            log.exception("canary monitor: reading %s failed", label)
            report.errors[label] = f"{type(e).__name__}: {e}"
            continue
        decision = decide_canary(canary, active, policy)
        report.decisions[(version.model, version.version_id)] = decision
        skip = _skip_reason(decision.action, version, policy, state)
        evidence = {
            "decision": decision.action, "reasons": list(decision.reasons),
            "model": version.model, "canary_version": version.version_id, "active_version": version.active_version,
            "canary_since_ms": version.since_ms, "window": [version.since_ms, now_ms],
            "arms": {"canary": arm_summary(canary), "active": arm_summary(active)},
            "checks": msgspec.to_builtins(decision.checks), "alpha": decision.alpha,
            "alpha_corrected": decision.alpha_corrected, "policy": policy.model_dump(),
        }
        result = MonitorResult(
            ts_ms=now_ms, tenant=version.tenant, monitor=MONITOR, metric=METRIC, model=version.model,
            model_version=version.version_id, window_start_ms=version.since_ms, window_end_ms=now_ms,
            value=_CODE[decision.action], threshold=0.0, sample_size=min(canary.requests, active.requests, 2**32 - 1),
            status=_status(decision),
            details=json.dumps({**evidence, "monitor_kind": MONITOR, "canary_arm": "canary",
                                "requested": None if skip or decision.action == "wait" else REQUESTS[decision.action],
                                "request_skipped": skip}, default=str))
        report.results.append(result)
        if decision.action == "wait" or skip:
            continue
        request = ModelEvent(
            ts_ms=now_ms, tenant=version.tenant, model=version.model, version_id=version.version_id,
            base_model=version.base_model, adapter_path=version.adapter_path, state=REQUESTS[decision.action],
            previous_state="canary", actor=ACTOR, artifact_sha256=version.artifact_sha256,
            canary_share=version.canary_share,
            reason=f"canary monitor: {decision.action}: " + "; ".join(decision.reasons)[:900],
            # retrain/requests.py reads a request's evidence from its lineage's `evidence` key
            lineage=json.dumps({"evidence": {**evidence, "monitor_event_id": result.event_id}}, default=str))
        report.requests.append(request)
        report.alerts.append(Alert(
            event="fired", monitor=MONITOR, metric=METRIC, action=decision.action, tenant=version.tenant,
            model=version.model, model_version=version.version_id, canary_arm="canary", value=result.value,
            sample_size=result.sample_size, window_start_ms=version.since_ms, window_end_ms=now_ms, ts_ms=now_ms,
            reason=request.reason, monitor_event_id=result.event_id))
        state[request_key(version.model, version.version_id, decision.action)] = AlertState(
            firing=True, fired_at_ms=now_ms, opened_at_ms=now_ms)
        log.info("canary monitor requests %s of %s@%s: %s", decision.action, version.model, version.version_id,
                 "; ".join(decision.reasons))
    return report


def _status(decision: CanaryDecision) -> Literal["ok", "warn", "alert", "insufficient_data"]:
    if decision.action == "rollback":
        return "alert"
    if not decision.enough_samples:
        return "insufficient_data"
    return "warn" if decision.action == "wait" and decision.pending_bad else "ok"
