"""Win rates and Elo ratings between versions: values, intervals that cover the truth, determinism."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.graders.ratings import elo_ratings, online_elo, win_rate, win_rates


def matches(p_win: float, n: int, seed: int, a: str = "v2", b: str = "v1") -> list[tuple[str, str, float]]:
    rng = random.Random(seed)
    return [(a, b, 1.0 if rng.random() < p_win else 0.0) for _ in range(n)]


def test_win_rate_counts_ties_as_half_and_its_interval_narrows_with_more_comparisons() -> None:
    wr = win_rate(6, 2, 2)
    assert wr.value == pytest.approx(0.7) and wr.n == 10
    assert wr.ci.low < 0.7 < wr.ci.high
    big = win_rate(600, 200, 200)
    assert big.value == pytest.approx(0.7)
    assert big.ci.high - big.ci.low < (wr.ci.high - wr.ci.low) / 5
    empty = win_rate(0, 0)
    assert math.isnan(empty.value) and (empty.ci.low, empty.ci.high) == (0.0, 1.0)


def test_the_wilson_interval_covers_the_true_win_rate_about_95_percent_of_the_time() -> None:
    covered = 0
    for seed in range(300):
        ms = matches(0.6, 80, seed)
        wr = win_rates(ms)["v2"]
        covered += wr.ci.low <= 0.6 <= wr.ci.high
    assert 0.90 <= covered / 300 <= 0.99


def test_elo_gap_matches_the_win_probability_and_its_interval_excludes_no_difference() -> None:
    ms = matches(0.75, 400, seed=1)
    r = elo_ratings(ms, rounds=200, seed=0)
    expected_gap = 400 * math.log10(0.75 / 0.25)  # ~191 Elo points
    gap = r["v2"].value - r["v1"].value
    assert gap == pytest.approx(expected_gap, abs=45)
    assert r["v2"].ci.low > 1000 > r["v1"].ci.high  # significantly apart
    assert r["v2"].value + r["v1"].value == pytest.approx(2000)
    assert r["v2"].matches == 400


def test_equal_versions_get_overlapping_intervals_around_the_centre() -> None:
    r = elo_ratings(matches(0.5, 300, seed=2), rounds=200, seed=0)
    assert r["v1"].ci.low < 1000 < r["v1"].ci.high
    assert r["v2"].ci.low < 1000 < r["v2"].ci.high


def test_a_version_that_never_won_stays_finite_and_ratings_are_deterministic_for_a_seed() -> None:
    ms = [("v2", "v1", 1.0)] * 20
    r = elo_ratings(ms, rounds=50, seed=3)
    assert all(math.isfinite(x.value) and math.isfinite(x.ci.low) for x in r.values())
    assert r["v2"].value > r["v1"].value
    assert elo_ratings(ms, rounds=50, seed=3) == r


def test_bradley_terry_is_order_free_while_online_elo_is_not() -> None:
    ms = matches(0.7, 200, seed=4)
    assert elo_ratings(ms, rounds=0)["v2"].value == pytest.approx(elo_ratings(ms[::-1], rounds=0)["v2"].value)
    assert online_elo(ms)["v2"] != pytest.approx(online_elo(ms[::-1])["v2"])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]),
                          st.sampled_from([0.0, 0.5, 1.0])).filter(lambda m: m[0] != m[1]), min_size=1, max_size=40))
def test_ratings_are_finite_centred_and_inside_their_intervals(ms: list[tuple[str, str, float]]) -> None:
    r = elo_ratings(ms, rounds=20, seed=0)
    assert sum(x.value for x in r.values()) / len(r) == pytest.approx(1000, abs=1e-6)
    for x in r.values():
        assert math.isfinite(x.value) and x.ci.low <= x.ci.high
    rates = win_rates(ms)
    assert all(0 <= w.ci.low <= w.ci.high <= 1 for w in rates.values())
