"""The statistics behind a monitor's verdict: intervals, tests, the decision, and the alert state machine.

Pure functions on plain numbers; nothing here reads a clock or a store.

Repeated looks: a scheduler re-tests overlapping windows every few minutes, and a monitor tests many
groups (tenants x models x versions) at once. An uncorrected test at alpha would then fire on noise
far more often than alpha. We use a Bonferroni split (`corrected_alpha`): alpha is divided by the number
of looks that share data (current window / interval) times the number of groups tested in the cycle.
Bonferroni is valid under any dependence between the looks (overlapping windows are strongly
dependent), needs no state, and is conservative; the minimum effect size (`fire_at`) keeps what does
fire practically relevant. A true alpha-spending sequential test would need the looks of one incident
to be tracked as one experiment, which a sliding monitor does not have.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
from scipy import stats as _st

Alternative = Literal["greater", "less", "two-sided"]
Level = Literal["insufficient_data", "breach", "elevated", "normal"]


class Interval(msgspec.Struct, frozen=True):
    low: float
    high: float

    def __contains__(self, x: float) -> bool:
        return self.low <= x <= self.high


class TestResult(msgspec.Struct, frozen=True):
    """A test statistic and its p-value (NaN statistic and p = 1.0 when the test cannot be computed)."""

    statistic: float
    p_value: float


def z_score(confidence: float) -> float:
    """The two-sided normal quantile for `confidence` (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(_st.norm.ppf(0.5 + confidence / 2))


def _p(stat: float, alternative: Alternative, sf, cdf) -> float:  # type: ignore[no-untyped-def]
    if alternative == "greater":
        return float(sf(stat))
    if alternative == "less":
        return float(cdf(stat))
    return float(min(1.0, 2 * min(sf(stat), cdf(stat))))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial rate. n = 0 gives [0, 1] (nothing known)."""
    if successes < 0 or n < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return Interval(0.0, 1.0)
    z = z_score(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact at the edges (the formula leaves float dust there).
    return Interval(0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


def t_interval(mean: float, variance: float, n: int, confidence: float = 0.95) -> Interval:
    """Student-t interval for a mean from its sample variance (ddof=1). n < 2 gives (-inf, inf)."""
    if n < 2 or not math.isfinite(variance):
        return Interval(-math.inf, math.inf)
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(max(variance, 0.0) / n)
    return Interval(mean - half, mean + half)


def normal_interval(value: float, se: float, confidence: float = 0.95) -> Interval:
    """value ± z·se (for ratio estimates with a delta-method standard error)."""
    if not math.isfinite(se):
        return Interval(-math.inf, math.inf)
    half = z_score(confidence) * se
    return Interval(value - half, value + half)


def quantile_rank_interval(n: int, q: float, confidence: float = 0.95) -> tuple[int, int]:
    """1-based ranks (low, high) of the order statistics bounding the q-quantile (normal approx. to binomial).

    Distribution-free: for sorted values x, [x[low], x[high]] covers the true quantile with ~`confidence`.
    """
    if n <= 0:
        return 0, 0
    z = z_score(confidence)
    spread = z * math.sqrt(n * q * (1 - q))
    return max(1, math.floor(n * q - spread)), min(n, math.ceil(n * q + spread) + 1)


def two_proportion_z(x1: int, n1: int, x2: int, n2: int, alternative: Alternative = "two-sided") -> TestResult:
    """Pooled two-proportion z test of p1 vs p2 (`greater`: p1 > p2)."""
    if n1 <= 0 or n2 <= 0:
        return TestResult(math.nan, 1.0)
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    diff = x1 / n1 - x2 / n2
    if se == 0:  # both rates 0 or both 1: no evidence of a difference
        return TestResult(math.nan, 1.0)
    z = diff / se
    return TestResult(z, _p(z, alternative, _st.norm.sf, _st.norm.cdf))


def welch_t(mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int,
            alternative: Alternative = "two-sided") -> TestResult:
    """Welch's unequal-variance t test of mean1 vs mean2 (`greater`: mean1 > mean2)."""
    if n1 < 2 or n2 < 2:
        return TestResult(math.nan, 1.0)
    a, b = var1 / n1, var2 / n2
    se = math.sqrt(a + b)
    if se == 0:
        return TestResult(math.nan, 1.0)
    t = (mean1 - mean2) / se
    df = (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    return TestResult(t, _p(t, alternative, lambda s: _st.t.sf(s, df), lambda s: _st.t.cdf(s, df)))


def one_sample_t(mean: float, variance: float, n: int, mu0: float, alternative: Alternative = "two-sided") -> TestResult:
    """t test of a mean against the fixed value `mu0` (`greater`: mean > mu0)."""
    if n < 2 or variance <= 0:
        return TestResult(math.nan, 1.0)
    t = (mean - mu0) / math.sqrt(variance / n)
    return TestResult(t, _p(t, alternative, lambda s: _st.t.sf(s, n - 1), lambda s: _st.t.cdf(s, n - 1)))


def binomial_test(successes: int, n: int, p0: float, alternative: Alternative = "two-sided") -> TestResult:
    """Exact binomial test of a rate against the fixed rate `p0` (`greater`: rate > p0)."""
    if n <= 0:
        return TestResult(math.nan, 1.0)
    r = _st.binomtest(successes, n, min(max(p0, 0.0), 1.0), alternative=alternative)
    return TestResult(successes / n, float(r.pvalue))


def z_test(value1: float, se1: float, value2: float, se2: float = 0.0, alternative: Alternative = "two-sided") -> TestResult:
    """z test of two independent estimates with standard errors (se2 = 0: against a fixed value)."""
    se = math.sqrt(se1 * se1 + se2 * se2)
    if not math.isfinite(se) or se == 0:
        return TestResult(math.nan, 1.0)
    z = (value1 - value2) / se
    return TestResult(z, _p(z, alternative, _st.norm.sf, _st.norm.cdf))


def corrected_alpha(alpha: float, *, looks: int = 1, tests: int = 1) -> float:
    """Bonferroni: the per-test alpha that keeps the family-wise false-alarm rate at `alpha` (see module doc)."""
    return alpha / max(1, looks) / max(1, tests)


class Decision(msgspec.Struct, frozen=True):
    """What one evaluation says, before hysteresis and cooldown.

    `breach`: the deterioration reaches `fire_at` and is significant; `elevated`: it is above `clear_at`
    but not a breach; `normal`: at or below `clear_at`; `insufficient_data`: too few samples to say.
    """

    level: Level
    reason: str


def decide(*, deterioration: float, fire_at: float, clear_at: float, significant: bool,
           sample_sizes: tuple[int, ...], min_samples: int) -> Decision:
    """Classify one evaluation. `deterioration` grows as the metric gets worse (sign already applied).

    Every sample in `sample_sizes` (current, and baseline where there is one) must reach `min_samples`,
    else there is no decision at all. NaN deterioration is no decision either.
    """
    if min(sample_sizes, default=0) < min_samples:
        return Decision("insufficient_data", f"sample size {min(sample_sizes, default=0)} < {min_samples}")
    if math.isnan(deterioration):
        return Decision("insufficient_data", "no value")
    if deterioration >= fire_at:
        if significant:
            return Decision("breach", f"deterioration {deterioration:.4g} >= {fire_at:.4g} and significant")
        return Decision("elevated", f"deterioration {deterioration:.4g} >= {fire_at:.4g} but not significant")
    if deterioration > clear_at:
        return Decision("elevated", f"deterioration {deterioration:.4g} between {clear_at:.4g} and {fire_at:.4g}")
    return Decision("normal", f"deterioration {deterioration:.4g} <= {clear_at:.4g}")


class AlertState(msgspec.Struct, frozen=True):
    """One monitor/group's incident state: open or not, and when it last fired (for the cooldown)."""

    firing: bool = False
    fired_at_ms: int | None = None
    opened_at_ms: int | None = None


class Transition(msgspec.Struct, frozen=True):
    """The next state, and what to do now: `fire` (a new incident to act on), `resolve`, or nothing.

    `suppressed` is set when an incident opened inside the cooldown of the previous fire: it is shown
    as alerting but triggers nothing.
    """

    state: AlertState
    fire: bool = False
    resolve: bool = False
    suppressed: bool = False


def step(state: AlertState, level: Level, *, now_ms: int, cooldown_ms: int) -> Transition:
    """Hysteresis + cooldown. An incident opens on `breach` and stays open until the level is `normal`
    (below the clear threshold); `elevated` and `insufficient_data` keep the state as it is. Opening fires
    unless the previous fire is less than `cooldown_ms` ago. One incident fires at most once.
    """
    if state.firing:
        if level == "normal":
            return Transition(AlertState(False, state.fired_at_ms, None), resolve=True)
        return Transition(state)
    if level != "breach":
        return Transition(state)
    in_cooldown = state.fired_at_ms is not None and now_ms - state.fired_at_ms < cooldown_ms
    if in_cooldown:
        return Transition(AlertState(True, state.fired_at_ms, now_ms), suppressed=True)
    return Transition(AlertState(True, now_ms, now_ms), fire=True)
