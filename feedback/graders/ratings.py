"""Pairwise win rates and Elo ratings between model versions, with confidence intervals. Pure functions.

    wr = win_rate(wins=62, losses=30, ties=8)                 # 0.66, Wilson interval
    ratings = elo_ratings([("v2", "v1", 1.0), ("v1", "v2", 0.5), ...], rounds=200, seed=0)
    ratings["v2"].value, ratings["v2"].ci

A match is `(a, b, score_of_a)` with score 1 (a won), 0 (b won) or 0.5 (tie). Win rate counts a tie as
half a win. Elo ratings are Bradley-Terry strengths fitted by maximum likelihood (order-free, unlike
online Elo updates) on the Elo scale (400 points = 10:1 odds), centred on 1000; their intervals come
from a seeded percentile bootstrap over matches. A weak prior (one virtual tie per pair of versions that
met) keeps a version that never won finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feedback.monitors.stats import Interval, wilson_interval

Match = tuple[str, str, float]
ELO_SCALE = 400.0 / math.log(10.0)
ELO_CENTRE = 1000.0


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int
    value: float  # (wins + ties / 2) / comparisons; NaN with none
    ci: Interval

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties


def win_rate(wins: int, losses: int, ties: int = 0, *, confidence: float = 0.95) -> WinRate:
    """Win rate with ties as half wins, and its Wilson score interval ([0, 1] with no comparisons)."""
    if min(wins, losses, ties) < 0:
        raise ValueError("wins, losses and ties must be >= 0")
    n = wins + losses + ties
    successes = wins + ties / 2
    value = successes / n if n else math.nan
    return WinRate(wins, losses, ties, value, wilson_interval(successes, n, confidence))  # type: ignore[arg-type]


def win_rates(matches: Sequence[Match], *, confidence: float = 0.95) -> dict[str, WinRate]:
    """Every player's win rate over all its matches (as `a` or `b`)."""
    tally: dict[str, list[int]] = {}
    for a, b, s in matches:
        for player, score in ((a, s), (b, 1.0 - s)):
            t = tally.setdefault(player, [0, 0, 0])
            t[0 if score > 0.5 else 1 if score < 0.5 else 2] += 1
    return {p: win_rate(w, lo, ti, confidence=confidence) for p, (w, lo, ti) in sorted(tally.items())}


def online_elo(matches: Sequence[Match], *, k: float = 16.0, initial: float = ELO_CENTRE) -> dict[str, float]:
    """Classic sequential Elo updates in match order (order-dependent; kept for comparison with dashboards)."""
    r: dict[str, float] = {}
    for a, b, s in matches:
        ra, rb = r.setdefault(a, initial), r.setdefault(b, initial)
        expected = 1.0 / (1.0 + 10 ** ((rb - ra) / 400.0))
        r[a], r[b] = ra + k * (s - expected), rb - k * (s - expected)
    return r


def _bradley_terry(idx_a: np.ndarray, idx_b: np.ndarray, score: np.ndarray, players: int,
                   *, iters: int = 200, tol: float = 1e-9) -> np.ndarray:
    """Log-strengths (centred) by the MM algorithm, with one virtual tie per pair that met."""
    wins = np.zeros(players)
    games = np.zeros((players, players))
    np.add.at(wins, idx_a, score)
    np.add.at(wins, idx_b, 1.0 - score)
    np.add.at(games, (idx_a, idx_b), 1.0)
    games = games + games.T
    met = games > 0
    games = games + met  # the prior: one virtual tie...
    wins = wins + 0.5 * met.sum(axis=1)  # ...worth half a win to each side
    p = np.ones(players)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, wins / np.where(denom > 0, denom, 1.0), 1.0)
        new = new / np.exp(np.mean(np.log(new)))
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    logp = np.log(p)
    return logp - logp.mean()


@dataclass(frozen=True)
class Rating:
    value: float
    ci: Interval
    matches: int


def elo_ratings(matches: Sequence[Match], *, rounds: int = 200, confidence: float = 0.95,
                seed: int = 0) -> dict[str, Rating]:
    """Bradley-Terry Elo ratings (centred on 1000) with percentile-bootstrap intervals over `rounds` resamples.

    Deterministic for a given `seed`. No matches: an empty dict. Players that met nobody in a resample
    keep the centre there.
    """
    if not matches:
        return {}
    names = sorted({m[0] for m in matches} | {m[1] for m in matches})
    index = {n: i for i, n in enumerate(names)}
    ia = np.array([index[m[0]] for m in matches])
    ib = np.array([index[m[1]] for m in matches])
    sc = np.array([float(m[2]) for m in matches])
    point = ELO_CENTRE + ELO_SCALE * _bradley_terry(ia, ib, sc, len(names))
    rng = np.random.default_rng(seed)
    boot = np.empty((rounds, len(names)))
    for r in range(rounds):
        pick = rng.integers(0, len(matches), len(matches))
        boot[r] = ELO_CENTRE + ELO_SCALE * _bradley_terry(ia[pick], ib[pick], sc[pick], len(names))
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0) if rounds else (point, point)
    counts = np.bincount(np.concatenate([ia, ib]), minlength=len(names))
    return {n: Rating(float(point[i]), Interval(float(lo[i]), float(hi[i])), int(counts[i])) for n, i in index.items()}
