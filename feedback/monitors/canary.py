"""The canary monitor: a version in `canary` against the active arm, and the decision to promote or roll back.

    report = await run_canary(store, policy.canary, now_ms=now, state=state)   # runner.run_cycle calls this

For every model whose registry has a version in `canary` (its latest lifecycle row, operator requests
aside), both arms are measured over the canary's lifetime (since its `canary` row): requests, error,
guardrail block and redact rates, latency p95, thumbs-up rate and mean rating (each inference's latest
feedback of that kind), and head-to-head preferences between the arms. `decide_canary` (pure) turns the
two arms and the policy into `wait`, `promote` or `rollback`:

- rollback: error or block rate above the active arm's by more than its margin, or a user signal worse by
  more than its margin, each significant (one-sided, Bonferroni over the checks made: a rollback fires on
  any one of them, so the family of checks shares `alpha`);
- promote: every user signal with enough feedback passes a one-sided non-inferiority test (canary >
  active - margin) at `alpha` (all must pass, an intersection-union test, so no correction is needed),
  at least one such signal exists, and no error or block rate is above active + margin;
- wait: anything else (too few samples, or not significant yet).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from feedback.monitors.alerts import Alert
from feedback.monitors.base import GroupKey
from feedback.monitors.policy import CanaryPolicy
from feedback.monitors.stats import (
    AlertState,
    TestResult,
    binomial_test,
    corrected_alpha,
    two_proportion_z,
    welch_t,
    z_test,
)
from feedback.store.base import Store
from schemas.events import ModelEvent, MonitorResult

log = logging.getLogger(__name__)

MONITOR = "canary"
METRIC = "canary_decision"
ACTOR = "canary-monitor"
REQUESTS = {"promote": "promote_requested", "rollback": "rollback_requested"}
Action = Literal["wait", "promote", "rollback"]
_CODE = {"promote": 1.0, "wait": 0.0, "rollback": -1.0}


# -- the arms and the decision (pure) ---------------------------------------------------------------------------------


class ArmStats(msgspec.Struct, frozen=True, kw_only=True):
    """One arm over the canary's lifetime. `wins`/`comparisons`: preferences between the two arms."""

    requests: int = 0
    errors: int = 0
    blocked: int = 0
    redacted: int = 0
    latency_p95_ms: float | None = None
    thumbs_n: int = 0
    thumbs_up: int = 0
    rating_n: int = 0
    rating_mean: float | None = None
    rating_var: float | None = None
    wins: int = 0
    comparisons: int = 0

    def rates(self) -> dict[str, float | None]:
        def rate(x: int, n: int) -> float | None:
            return x / n if n else None

        return {"error_rate": rate(self.errors, self.requests), "block_rate": rate(self.blocked, self.requests),
                "redact_rate": rate(self.redacted, self.requests), "thumbs_up_rate": rate(self.thumbs_up, self.thumbs_n),
                "win_rate": rate(self.wins, self.comparisons)}


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """One comparison. `difference` is canary - active (win rate: canary's - 0.5), `worse_by` its bad-side
    size (positive = the canary is worse). `p_worse`: p of "worse by more than nothing" (harm: "higher"),
    `p_not_worse`: p of the non-inferiority test (user signals only)."""

    name: str
    kind: Literal["harm", "signal"]
    canary: float
    active: float
    difference: float
    worse_by: float
    margin: float
    n_canary: int
    n_active: int
    p_worse: float
    p_not_worse: float | None = None
    verdict: Literal["worse", "not_worse", "better", "within_margin", "above_margin", "inconclusive"] = "inconclusive"


class CanaryDecision(msgspec.Struct, frozen=True, kw_only=True):
    action: Action
    reasons: tuple[str, ...]
    checks: tuple[Check, ...] = ()
    alpha: float = 0.05
    alpha_corrected: float = 0.05
    enough_samples: bool = True

    @property
    def pending_bad(self) -> bool:
        """Some check is past its margin on the bad side but not significant (yet)."""
        return any(c.worse_by > c.margin for c in self.checks)


def _p(result: TestResult) -> float:
    return result.p_value if math.isfinite(result.p_value) else 1.0


def _adjusted(x: int, n: int) -> tuple[float, float]:
    """Agresti-Caffo: the rate with one success and one failure added, and its variance. Never 0."""
    p = (x + 1) / (n + 2)
    return p, p * (1 - p) / (n + 2)


def _rate_signal(name: str, xc: int, nc: int, xa: int, na: int, margin: float) -> Check:
    pc, vc = _adjusted(xc, nc)
    pa, va = _adjusted(xa, na)
    worse = _p(two_proportion_z(xc, nc, xa, na, "less"))
    not_worse = _p(z_test(pc - pa, math.sqrt(vc + va), -margin, 0.0, "greater"))
    c, a = xc / nc, xa / na
    return Check(name=name, kind="signal", canary=c, active=a, difference=c - a, worse_by=a - c, margin=margin,
                 n_canary=nc, n_active=na, p_worse=worse, p_not_worse=not_worse)


def _mean_p(mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int, alternative: Literal["greater", "less"]) -> float:
    if var1 <= 0 and var2 <= 0:  # every rating equal in both arms: the difference is exact
        diff = mean1 - mean2
        return 0.0 if (diff > 0 if alternative == "greater" else diff < 0) else 1.0
    return _p(welch_t(mean1, max(var1, 0.0), n1, mean2, max(var2, 0.0), n2, alternative))


def _rating_signal(c: ArmStats, a: ArmStats, margin: float) -> Check:
    mc, ma = c.rating_mean or 0.0, a.rating_mean or 0.0
    vc = c.rating_var if c.rating_var is not None and math.isfinite(c.rating_var) else 0.0
    va = a.rating_var if a.rating_var is not None and math.isfinite(a.rating_var) else 0.0
    worse = _mean_p(mc, vc, c.rating_n, ma, va, a.rating_n, "less")
    not_worse = _mean_p(mc + margin, vc, c.rating_n, ma, va, a.rating_n, "greater")
    return Check(name="mean_rating", kind="signal", canary=mc, active=ma, difference=mc - ma, worse_by=ma - mc,
                 margin=margin, n_canary=c.rating_n, n_active=a.rating_n, p_worse=worse, p_not_worse=not_worse)


def _preference_signal(c: ArmStats, margin: float) -> Check:
    rate = c.wins / c.comparisons
    worse = _p(binomial_test(c.wins, c.comparisons, 0.5, "less"))
    not_worse = _p(binomial_test(c.wins, c.comparisons, 0.5 - margin, "greater"))
    return Check(name="win_rate", kind="signal", canary=rate, active=1 - rate, difference=rate - 0.5,
                 worse_by=0.5 - rate, margin=margin, n_canary=c.comparisons, n_active=c.comparisons,
                 p_worse=worse, p_not_worse=not_worse)


def _harm(name: str, xc: int, xa: int, c: ArmStats, a: ArmStats, margin: float) -> Check:
    rc, ra = xc / c.requests, xa / a.requests
    worse = _p(two_proportion_z(xc, c.requests, xa, a.requests, "greater"))
    return Check(name=name, kind="harm", canary=rc, active=ra, difference=rc - ra, worse_by=rc - ra, margin=margin,
                 n_canary=c.requests, n_active=a.requests, p_worse=worse)


def decide_canary(canary: ArmStats, active: ArmStats, policy: CanaryPolicy) -> CanaryDecision:
    """Promote, roll back or wait, with the checks behind it (see the module doc). Pure; never raises."""
    if min(canary.requests, active.requests) < policy.min_samples:
        return CanaryDecision(action="wait", alpha=policy.alpha, alpha_corrected=policy.alpha, enough_samples=False,
                              reasons=(f"too few requests: canary {canary.requests}, active {active.requests} "
                                       f"(need {policy.min_samples} per arm)",))
    checks = [_harm("error_rate", canary.errors, active.errors, canary, active, policy.max_error_rate_increase),
              _harm("block_rate", canary.blocked, active.blocked, canary, active, policy.max_block_rate_increase)]
    need = policy.min_feedback
    if min(canary.thumbs_n, active.thumbs_n) >= need:
        checks.append(_rate_signal("thumbs_up_rate", canary.thumbs_up, canary.thumbs_n, active.thumbs_up,
                                   active.thumbs_n, policy.non_inferiority_margin))
    if min(canary.rating_n, active.rating_n) >= need:
        checks.append(_rating_signal(canary, active, policy.rating_margin))
    if canary.comparisons >= need:
        checks.append(_preference_signal(canary, policy.non_inferiority_margin))
    alpha = corrected_alpha(policy.alpha, tests=len(checks))
    judged, rollback, pending = [], [], []
    for c in checks:
        if c.worse_by > c.margin and c.p_worse < alpha:
            verdict = "worse" if c.kind == "signal" else "above_margin"
            rollback.append(f"{c.name} {c.canary:.4g} vs active {c.active:.4g}: worse by {c.worse_by:.4g} > margin "
                            f"{c.margin:.4g}, p={c.p_worse:.2g} < {alpha:.2g}")
        elif c.kind == "harm":
            verdict = "within_margin" if c.worse_by <= c.margin else "inconclusive"
            if verdict == "inconclusive":
                pending.append(f"{c.name} {c.canary:.4g} vs active {c.active:.4g}: above margin {c.margin:.4g} "
                               f"but not significant (p={c.p_worse:.2g})")
        elif c.p_not_worse is not None and c.p_not_worse < policy.alpha:
            verdict = "better" if c.difference > 0 and _better(c, policy.alpha) else "not_worse"
        else:
            verdict = "inconclusive"
            pending.append(f"{c.name} {c.canary:.4g} vs active {c.active:.4g}: not shown within margin "
                           f"{c.margin:.4g} yet (p={c.p_not_worse if c.p_not_worse is not None else 1.0:.2g})")
        judged.append(msgspec.structs.replace(c, verdict=verdict))
    common = {"checks": tuple(judged), "alpha": policy.alpha, "alpha_corrected": alpha}
    if rollback:
        return CanaryDecision(action="rollback", reasons=tuple(rollback), **common)
    signals = [c for c in judged if c.kind == "signal"]
    if not signals:
        return CanaryDecision(action="wait", reasons=(
            f"too little feedback: need {need} rated responses per arm (thumbs: canary {canary.thumbs_n}, active "
            f"{active.thumbs_n}; ratings: {canary.rating_n}, {active.rating_n}; preferences: {canary.comparisons})",),
            **common)
    if pending:
        return CanaryDecision(action="wait", reasons=tuple(pending), **common)
    return CanaryDecision(action="promote", reasons=tuple(
        f"{c.name} {c.canary:.4g} vs active {c.active:.4g}: {c.verdict.replace('_', ' ')} "
        f"(margin {c.margin:.4g}, p={c.p_not_worse:.2g})" for c in signals), **common)


def _better(c: Check, alpha: float) -> bool:
    # Significantly better than the active arm outright: the same test as "worse", the other way round.
    return 1.0 - c.p_worse < alpha if math.isfinite(c.p_worse) else False


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
        WHERE model = {model:String}
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


def latest_decisions(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """The newest canary result per (model, version) among monitor_results rows (any order)."""
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in rows:
        key = (str(r["model"]), str(r["model_version"]))
        if key not in out or out[key]["ts_ms"] < r["ts_ms"]:
            out[key] = r
    return out
