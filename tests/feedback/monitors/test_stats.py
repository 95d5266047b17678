"""The statistics as a specification: known inputs give known intervals, tests and decisions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from feedback.monitors.stats import (
    AlertState,
    binomial_test,
    corrected_alpha,
    decide,
    one_sample_t,
    quantile_rank_interval,
    step,
    t_interval,
    two_proportion_z,
    welch_t,
    wilson_interval,
)

HOUR = 3_600_000


def test_wilson_interval_matches_the_textbook_values() -> None:
    ci = wilson_interval(8, 10)  # Wilson (1927) / Newcombe (1998): 0.4902, 0.9433
    assert (ci.low, ci.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10).low == 0.0 and wilson_interval(10, 10).high == 1.0
    assert (wilson_interval(0, 0).low, wilson_interval(0, 0).high) == (0.0, 1.0)  # nothing known
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@given(st.integers(0, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_always_holds_the_observed_rate_within_0_1(xn: tuple[int, int]) -> None:
    x, n = xn
    ci = wilson_interval(x, n)
    assert 0.0 <= ci.low <= ci.high <= 1.0
    if n:
        assert ci.low <= x / n <= ci.high


def test_t_interval_uses_student_t() -> None:
    ci = t_interval(10.0, 4.0, 16)  # t(0.975, 15) = 2.1314, se = 0.5
    assert (ci.low, ci.high) == pytest.approx((10 - 1.06572, 10 + 1.06572), abs=1e-4)
    assert t_interval(1.0, math.nan, 1).low == -math.inf


def test_quantile_rank_interval_brackets_the_rank() -> None:
    lo, hi = quantile_rank_interval(1000, 0.95)
    assert lo < 950 < hi and (lo, hi) == (936, 965)
    assert quantile_rank_interval(0, 0.5) == (0, 0)


def test_two_proportion_z_test_known_value() -> None:
    r = two_proportion_z(80, 100, 60, 100)  # pooled 0.7, se = sqrt(0.7*0.3*0.02)
    assert r.statistic == pytest.approx(0.2 / math.sqrt(0.0042))
    assert r.p_value == pytest.approx(0.002028, abs=1e-5)
    assert two_proportion_z(80, 100, 60, 100, "greater").p_value == pytest.approx(r.p_value / 2)
    assert two_proportion_z(80, 100, 60, 100, "less").p_value > 0.99
    assert two_proportion_z(0, 10, 0, 10).p_value == 1.0 and two_proportion_z(1, 0, 1, 10).p_value == 1.0


def test_welch_t_test_agrees_with_scipy() -> None:
    ours = welch_t(5.2, 1.3, 40, 4.6, 2.9, 25)
    theirs = sps.ttest_ind_from_stats(5.2, math.sqrt(1.3), 40, 4.6, math.sqrt(2.9), 25, equal_var=False)
    assert ours.statistic == pytest.approx(theirs.statistic) and ours.p_value == pytest.approx(theirs.pvalue)
    assert welch_t(1, 1, 1, 1, 1, 10).p_value == 1.0


def test_tests_against_a_fixed_threshold() -> None:
    assert binomial_test(12, 100, 0.05, "greater").p_value < 0.01  # 12 % errors vs a 5 % ceiling
    assert binomial_test(6, 100, 0.05, "greater").p_value > 0.3
    r = one_sample_t(110.0, 100.0, 25, 100.0, "greater")  # t = 10 / 2 = 5
    assert r.statistic == pytest.approx(5.0) and r.p_value < 1e-4


def test_bonferroni_divides_alpha_by_looks_and_groups() -> None:
    assert corrected_alpha(0.05, looks=12, tests=5) == pytest.approx(0.05 / 60)
    assert corrected_alpha(0.05, looks=0, tests=0) == 0.05


def test_not_enough_samples_means_no_decision_whatever_the_effect() -> None:
    d = decide(deterioration=0.5, fire_at=0.05, clear_at=0.02, significant=True, sample_sizes=(99, 1000),
               min_samples=100)
    assert d.level == "insufficient_data" and "99 < 100" in d.reason
    assert decide(deterioration=math.nan, fire_at=0.05, clear_at=0.02, significant=True, sample_sizes=(500,),
                  min_samples=100).level == "insufficient_data"


@pytest.mark.parametrize(("deterioration", "significant", "level"), [
    (0.10, True, "breach"),
    (0.05, True, "breach"),       # at the threshold fires
    (0.10, False, "elevated"),    # big but not significant: no alert
    (0.03, True, "elevated"),     # between clear and fire
    (0.02, True, "normal"),       # at the clear level
    (-0.10, True, "normal"),      # better than baseline
])
def test_decide(deterioration: float, significant: bool, level: str) -> None:
    assert decide(deterioration=deterioration, fire_at=0.05, clear_at=0.02, significant=significant,
                  sample_sizes=(200, 200), min_samples=100).level == level


def test_hysteresis_fires_once_holds_while_elevated_and_clears_only_below_the_clear_level() -> None:
    s, fired, resolved = AlertState(), [], []
    for t, level in enumerate(["normal", "breach", "breach", "elevated", "insufficient_data", "breach", "normal",
                               "elevated"]):
        tr = step(s, level, now_ms=t * HOUR * 10, cooldown_ms=HOUR)  # type: ignore[arg-type]
        s = tr.state
        fired.append(tr.fire)
        resolved.append(tr.resolve)
    assert fired == [False, True, False, False, False, False, False, False]
    assert resolved == [False, False, False, False, False, False, True, False]
    assert not s.firing and s.fired_at_ms == 10 * HOUR


def test_cooldown_suppresses_a_new_incident_soon_after_a_fire_but_not_later() -> None:
    first = step(AlertState(), "breach", now_ms=0, cooldown_ms=6 * HOUR)
    assert first.fire
    cleared = step(first.state, "normal", now_ms=HOUR, cooldown_ms=6 * HOUR).state
    soon = step(cleared, "breach", now_ms=2 * HOUR, cooldown_ms=6 * HOUR)
    assert soon.state.firing and not soon.fire and soon.suppressed
    cleared = step(soon.state, "normal", now_ms=3 * HOUR, cooldown_ms=6 * HOUR).state
    later = step(cleared, "breach", now_ms=7 * HOUR, cooldown_ms=6 * HOUR)
    assert later.fire and later.state.fired_at_ms == 7 * HOUR
