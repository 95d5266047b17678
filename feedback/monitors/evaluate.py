"""One policy entry on one group: the significance test and the decision, before hysteresis. Pure."""

from __future__ import annotations

import math

import msgspec

from feedback.monitors.policy import MonitorPolicy
from feedback.monitors.quality import Estimate, estimate_of
from feedback.monitors.stats import (
    Decision,
    Interval,
    TestResult,
    binomial_test,
    decide,
    one_sample_t,
    two_proportion_z,
    welch_t,
    z_test,
)


class Evaluation(msgspec.Struct, frozen=True, kw_only=True):
    """One quality policy entry on one group: the numbers, the test and the decision."""

    value: float
    baseline: float | None
    deterioration: float
    p_value: float | None
    significant: bool
    decision: Decision
    n: int
    n_baseline: int | None
    ci: Interval
    baseline_ci: Interval | None


def _test(policy: MonitorPolicy, cur: Estimate, base: Estimate | None) -> TestResult | None:
    """One-sided test that `cur` is worse than `base` (or than the threshold); None where no p-value exists."""
    alt = "greater" if policy.worse == "increase" else "less"
    if base is not None:
        if cur.kind == "rate":
            return two_proportion_z(cur.successes, cur.n, base.successes, base.n, alt)
        if cur.kind == "mean":
            return welch_t(cur.value, cur.variance, cur.n, base.value, base.variance, base.n, alt)
        if cur.kind == "ratio":
            return z_test(cur.value, cur.se, base.value, base.se, alt)
        return None
    if cur.kind == "rate":
        return binomial_test(cur.successes, cur.n, policy.threshold, alt)
    if cur.kind == "mean":
        return one_sample_t(cur.value, cur.variance, cur.n, policy.threshold, alt)
    if cur.kind == "ratio":
        return z_test(cur.value, cur.se, policy.threshold, 0.0, alt)
    return None


def evaluate(policy: MonitorPolicy, cur: Estimate, base: Estimate | None, *, alpha: float) -> Evaluation:
    """Compare one group's current estimate with its baseline (or the threshold) and decide. Pure.

    Quantiles have no p-value: their change counts as significant when the confidence intervals do not
    overlap (against the threshold: when the interval lies wholly on the worse side).
    """
    sign = 1.0 if policy.worse == "increase" else -1.0
    clear = policy.clear if policy.clear is not None else policy.threshold
    if policy.compare == "baseline":
        base = base if base is not None else estimate_of(None, policy.metric)
        delta = sign * (cur.value - base.value)
        if policy.relative:
            delta = delta / abs(base.value) if base.value else (math.inf if delta > 0 else 0.0 if delta == 0 else -math.inf)
        fire_at, clear_at, sizes = policy.threshold, clear, (cur.n, base.n)
    else:
        base = None
        delta, fire_at, clear_at, sizes = sign * cur.value, sign * policy.threshold, sign * clear, (cur.n,)
    test = _test(policy, cur, base)
    if test is not None:
        p_value: float | None = test.p_value
        significant = test.p_value < alpha
    else:
        p_value = None
        ref = base.ci if base is not None else Interval(policy.threshold, policy.threshold)
        significant = cur.ci.low > ref.high if sign > 0 else cur.ci.high < ref.low
    decision = decide(deterioration=delta, fire_at=fire_at, clear_at=clear_at, significant=significant,
                      sample_sizes=sizes, min_samples=policy.min_samples)
    return Evaluation(value=cur.value, baseline=base.value if base is not None else None, deterioration=delta,
                      p_value=p_value, significant=significant, decision=decision, n=cur.n,
                      n_baseline=base.n if base is not None else None, ci=cur.ci,
                      baseline_ci=base.ci if base is not None else None)
