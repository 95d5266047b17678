"""The canary decision: two arms' statistics and the policy in, `wait` / `promote` / `rollback` out. Pure.

- rollback: error or block rate above the active arm's by more than its margin, or a user signal (thumbs-up
  rate, mean rating, head-to-head win rate) worse by more than its margin, each significant (one-sided,
  Bonferroni over the checks made: a rollback fires on any one of them, so the family shares `alpha`);
- promote: every user signal with enough feedback passes a one-sided non-inferiority test (canary >
  active - margin) at `alpha` (all must pass, an intersection-union test, so no correction is needed),
  at least one such signal exists, and no error or block rate is above active + margin;
- wait: anything else (too few samples, or not significant yet).

Rates use the pooled two-proportion z test for "worse" and an Agresti-Caffo interval (never a zero standard
error) for non-inferiority; ratings Welch's t; preferences the exact binomial test against 0.5.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from feedback.monitors.policy import CanaryPolicy
from feedback.monitors.stats import (
    TestResult,
    binomial_test,
    corrected_alpha,
    two_proportion_z,
    welch_t,
    z_test,
)

Action = Literal["wait", "promote", "rollback"]


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
