"""Quality metrics per tenant / model / model version / canary arm, over a current and a baseline window.

Two queries per window pair, whatever the number of metrics and groups: one scan of `inferences` (with
each inference's latest thumbs, rating and correction joined from `feedback`) and one of preference
feedback for pairwise win rates. Every metric comes back as an `Estimate` with its sample size, a
confidence interval and the sufficient statistics the significance tests need.

Attribution: thumbs, ratings and corrections count toward the window of the inference they rate (an
inference counts once, by its latest feedback of each kind, seen up to the end of the current window);
a preference counts toward the window in which it was given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import msgspec

from feedback.monitors.base import GroupKey, MonitorWindow
from feedback.monitors.stats import Interval, normal_interval, t_interval, wilson_interval, z_score
from feedback.store.base import ParamValue, Store

Kind = Literal["rate", "mean", "quantile", "ratio"]
Direction = Literal["increase", "decrease"]


class MetricSpec(msgspec.Struct, frozen=True):
    """A quality metric: how it is estimated and which way is worse."""

    kind: Kind
    worse: Direction
    description: str


METRICS: dict[str, MetricSpec] = {
    "thumbs_up_rate": MetricSpec("rate", "decrease", "share of thumbs-rated inferences rated up"),
    "mean_rating": MetricSpec("mean", "decrease", "mean of each rated inference's latest rating"),
    "correction_rate": MetricSpec("rate", "increase", "share of requests that received a correction"),
    "win_rate": MetricSpec("rate", "decrease", "share of preference comparisons against other versions won"),
    "block_rate": MetricSpec("rate", "increase", "share of requests a guardrail blocked (input or output)"),
    "redact_rate": MetricSpec("rate", "increase", "share of requests a guardrail redacted (input or output)"),
    "error_rate": MetricSpec("rate", "increase", "share of requests that ended in an error"),
    "latency_p50_ms": MetricSpec("quantile", "increase", "median request latency (requests not blocked)"),
    "latency_p95_ms": MetricSpec("quantile", "increase", "95th percentile request latency"),
    "latency_p99_ms": MetricSpec("quantile", "increase", "99th percentile request latency"),
    "latency_mean_ms": MetricSpec("mean", "increase", "mean request latency"),
    "ttft_mean_ms": MetricSpec("mean", "increase", "mean time to first token (successful requests)"),
    "tokens_per_request": MetricSpec("mean", "increase", "prompt + completion tokens per successful request"),
    "cost_per_1k_tokens": MetricSpec("ratio", "increase", "cost per 1,000 tokens from the price table"),
}


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """One metric over one group and window. `value` is NaN when `n` is 0.

    Rates carry `successes`; means `variance` (sample, ddof=1); ratios `se` (delta method).
    """

    kind: Kind
    value: float
    n: int
    ci: Interval
    successes: int = 0
    variance: float = math.nan
    se: float = math.nan


class Price(msgspec.Struct, frozen=True):
    """Price per 1,000 tokens, input and output, in any currency unit."""

    input_per_1k: float = 0.0
    output_per_1k: float = 0.0


GroupMetrics = dict[GroupKey, dict[str, Estimate]]


class QualitySnapshot(msgspec.Struct, frozen=True):
    """Every metric of every group seen in either window."""

    window: MonitorWindow
    current: GroupMetrics
    baseline: GroupMetrics


_PERIOD = """multiIf(ts >= fromUnixTimestamp64Milli({cur_start:Int64}, 'UTC')
                    AND ts < fromUnixTimestamp64Milli({cur_end:Int64}, 'UTC'), 1,
                ts >= fromUnixTimestamp64Milli({base_start:Int64}, 'UTC')
                    AND ts < fromUnixTimestamp64Milli({base_end:Int64}, 'UTC'), 0, -1)"""
_SPAN = ("ts >= fromUnixTimestamp64Milli({span_start:Int64}, 'UTC') "
         "AND ts < fromUnixTimestamp64Milli({span_end:Int64}, 'UTC')")
_QUANTILES = {"latency_p50_ms": 0.50, "latency_p95_ms": 0.95, "latency_p99_ms": 0.99}


def _rank_sql(q: float, z: float, which: Literal["low", "mid", "high"]) -> str:
    # 1-based ranks into the sorted array `lat` of length `n_lat` (see stats.quantile_rank_interval).
    spread = f"{z!r} * sqrt(n_lat * {q!r} * {1 - q!r})"
    if which == "mid":
        return f"lat[toUInt64(greatest(1, ceil(n_lat * {q!r})))]"
    if which == "low":
        return f"lat[toUInt64(greatest(1, floor(n_lat * {q!r} - {spread})))]"
    return f"lat[toUInt64(least(toFloat64(n_lat), ceil(n_lat * {q!r} + {spread}) + 1))]"


# Feedback joins its inference on a 64-bit hash of (tenant, id): the tenant in the key keeps another tenant's
# ratings out, and a UInt64 key joins 1M rows 3-4x faster than the (LowCardinality tenant, String id) pair.
def _inference_sql(z: float) -> str:
    quantiles = ",\n               ".join(
        f"{_rank_sql(q, z, w)} AS {name}_{w}" for name, q in _QUANTILES.items() for w in ("low", "mid", "high"))
    return f"""
        WITH
        w AS (
            SELECT cityHash64(tenant, event_id) AS fb_key, tenant, model, model_version, canary_arm, {_PERIOD} AS period,
                   status, latency_ms, ttft_ms, tokens_in, tokens_out, input_action, output_action,
                   (transform(toString(model), {{price_models:Array(String)}}, {{price_in:Array(Float64)}},
                              {{default_in:Float64}}) * tokens_in
                    + transform(toString(model), {{price_models:Array(String)}}, {{price_out:Array(Float64)}},
                                {{default_out:Float64}}) * tokens_out) / 1000 AS cost
            FROM inferences FINAL
            WHERE {_SPAN} AND period >= 0 AND NOT shadow
        ),
        fb AS (
            SELECT cityHash64(tenant, target_id) AS fb_key,
                   countIf(kind = 'thumbs' AND thumbs IS NOT NULL) > 0 AS has_thumbs,
                   argMaxIf(assumeNotNull(thumbs), ts, kind = 'thumbs' AND thumbs IS NOT NULL) AS up,
                   countIf(kind = 'rating' AND rating IS NOT NULL) > 0 AS has_rating,
                   argMaxIf(assumeNotNull(rating), ts, kind = 'rating' AND rating IS NOT NULL) AS last_rating,
                   countIf(kind = 'correction') > 0 AS corrected
            FROM feedback FINAL
            WHERE {_SPAN} AND kind IN ('thumbs', 'rating', 'correction')
            GROUP BY fb_key
        ),
        g AS (
            SELECT w.period AS period, w.tenant AS tenant, w.model AS model, w.model_version AS model_version,
                   w.canary_arm AS canary_arm,
                   count() AS requests,
                   countIf(w.status = 'error') AS errors,
                   countIf(w.status = 'blocked' OR w.input_action = 'block' OR w.output_action = 'block') AS blocked,
                   countIf(w.input_action = 'redact' OR w.output_action = 'redact') AS redacted,
                   countIf(fb.corrected) AS corrected,
                   countIf(fb.has_thumbs) AS thumbs_n,
                   countIf(fb.has_thumbs AND fb.up) AS thumbs_up,
                   countIf(fb.has_rating) AS rating_n,
                   avgIf(fb.last_rating, fb.has_rating) AS rating_mean,
                   varSampIf(fb.last_rating, fb.has_rating) AS rating_var,
                   arraySort(groupArrayIf(w.latency_ms, w.status != 'blocked')) AS lat,
                   length(lat) AS n_lat,
                   avgIf(w.latency_ms, w.status != 'blocked') AS lat_mean,
                   varSampIf(w.latency_ms, w.status != 'blocked') AS lat_var,
                   countIf(w.status = 'ok' AND w.ttft_ms > 0) AS ttft_n,
                   avgIf(w.ttft_ms, w.status = 'ok' AND w.ttft_ms > 0) AS ttft_mean,
                   varSampIf(w.ttft_ms, w.status = 'ok' AND w.ttft_ms > 0) AS ttft_var,
                   countIf(w.status = 'ok') AS ok_n,
                   avgIf(w.tokens_in + w.tokens_out, w.status = 'ok') AS tok_mean,
                   varSampIf(toFloat64(w.tokens_in + w.tokens_out), w.status = 'ok') AS tok_var,
                   sumIf(w.cost, w.status = 'ok') AS cost_sum,
                   sumIf(w.tokens_in + w.tokens_out, w.status = 'ok') AS tok_sum,
                   varSampIf(w.cost, w.status = 'ok') AS cost_var,
                   covarSampIf(w.cost, toFloat64(w.tokens_in + w.tokens_out), w.status = 'ok') AS cost_tok_cov
            FROM w ANY LEFT JOIN fb ON fb.fb_key = w.fb_key
            GROUP BY period, tenant, model, model_version, canary_arm
        )
        SELECT period, tenant, model, model_version, canary_arm, requests, errors, blocked, redacted, corrected,
               thumbs_n, thumbs_up, rating_n, rating_mean, rating_var, n_lat, lat_mean, lat_var,
               ttft_n, ttft_mean, ttft_var, ok_n, tok_mean, tok_var, cost_sum, tok_sum, cost_var, cost_tok_cov,
               {quantiles}
        FROM g"""


_PREFERENCE_SQL = f"""
    WITH
    p AS (
        SELECT tenant, ts, preferred_id, other_id, {_PERIOD} AS period
        FROM feedback FINAL
        WHERE {_SPAN} AND kind = 'preference' AND period >= 0
        ORDER BY ts, event_id
        LIMIT 1 BY tenant, if(idempotency_key = '', event_id, idempotency_key)
    ),
    i AS (
        SELECT event_id, tenant, model, model_version, canary_arm FROM inferences FINAL
        WHERE event_id IN (SELECT arrayJoin([preferred_id, other_id]) FROM p)
    )
    SELECT period, tenant, model, side.1 AS model_version, side.2 AS canary_arm,
           sum(side.3) AS wins, count() AS comparisons
    FROM (
        SELECT p.period AS period, p.tenant AS tenant, a.model AS model,
               arrayJoin([(a.model_version, a.canary_arm, 1), (b.model_version, b.canary_arm, 0)]) AS side
        FROM p
        INNER JOIN i AS a ON a.event_id = p.preferred_id AND a.tenant = p.tenant
        INNER JOIN i AS b ON b.event_id = p.other_id AND b.tenant = p.tenant
        WHERE a.model = b.model AND a.model_version != b.model_version
    )
    GROUP BY period, tenant, model, model_version, canary_arm"""


def _params(window: MonitorWindow, prices: Mapping[str, Price]) -> dict[str, ParamValue]:
    named = {m: p for m, p in prices.items() if m != "*"}
    default = prices.get("*", Price())
    span = window.span
    return {
        "cur_start": window.current.start_ms, "cur_end": window.current.end_ms,
        "base_start": window.baseline.start_ms, "base_end": window.baseline.end_ms,
        "span_start": span.start_ms, "span_end": span.end_ms,
        "price_models": list(named),
        "price_in": [p.input_per_1k for p in named.values()],  # type: ignore[dict-item]
        "price_out": [p.output_per_1k for p in named.values()],  # type: ignore[dict-item]
        "default_in": default.input_per_1k, "default_out": default.output_per_1k,
    }


def _num(v: object) -> float:
    return math.nan if v is None else float(v)  # type: ignore[arg-type]


def _rate(successes: int, n: int, confidence: float) -> Estimate:
    return Estimate(kind="rate", value=successes / n if n else math.nan, n=n,
                    ci=wilson_interval(successes, n, confidence), successes=successes)


def _mean(mean: object, var: object, n: int, confidence: float) -> Estimate:
    m, v = (_num(mean), _num(var)) if n else (math.nan, math.nan)
    return Estimate(kind="mean", value=m, n=n, ci=t_interval(m, v, n, confidence), variance=v)


def _ratio(row: Mapping[str, object], confidence: float) -> Estimate:
    """Cost per 1k tokens = 1000·Σcost/Σtokens; its standard error by the delta method."""
    n, tokens = int(row["ok_n"]), _num(row["tok_sum"])  # type: ignore[call-overload]
    if n == 0 or tokens <= 0:
        return Estimate(kind="ratio", value=math.nan, n=n, ci=Interval(-math.inf, math.inf))
    r = _num(row["cost_sum"]) / tokens
    x_bar = tokens / n
    var = (_num(row["cost_var"]) - 2 * r * _num(row["cost_tok_cov"]) + r * r * _num(row["tok_var"])) / (n * x_bar**2)
    se = 1000 * math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan
    return Estimate(kind="ratio", value=1000 * r, n=n, ci=normal_interval(1000 * r, se, confidence), se=se)


def _inference_metrics(row: Mapping[str, object], confidence: float) -> dict[str, Estimate]:
    i = {k: int(row[k]) for k in ("requests", "errors", "blocked", "redacted", "corrected", "thumbs_n",  # type: ignore[call-overload]
                                  "thumbs_up", "rating_n", "n_lat", "ttft_n", "ok_n")}
    out = {
        "thumbs_up_rate": _rate(i["thumbs_up"], i["thumbs_n"], confidence),
        "mean_rating": _mean(row["rating_mean"], row["rating_var"], i["rating_n"], confidence),
        "correction_rate": _rate(i["corrected"], i["requests"], confidence),
        "block_rate": _rate(i["blocked"], i["requests"], confidence),
        "redact_rate": _rate(i["redacted"], i["requests"], confidence),
        "error_rate": _rate(i["errors"], i["requests"], confidence),
        "latency_mean_ms": _mean(row["lat_mean"], row["lat_var"], i["n_lat"], confidence),
        "ttft_mean_ms": _mean(row["ttft_mean"], row["ttft_var"], i["ttft_n"], confidence),
        "tokens_per_request": _mean(row["tok_mean"], row["tok_var"], i["ok_n"], confidence),
        "cost_per_1k_tokens": _ratio(row, confidence),
    }
    for name in _QUANTILES:
        n = i["n_lat"]
        out[name] = Estimate(kind="quantile", value=_num(row[f"{name}_mid"]) if n else math.nan, n=n,
                             ci=Interval(_num(row[f"{name}_low"]), _num(row[f"{name}_high"])) if n
                             else Interval(-math.inf, math.inf))
    return out


def _key(row: Mapping[str, object]) -> GroupKey:
    return GroupKey(str(row["tenant"]), str(row["model"]), str(row["model_version"]), str(row["canary_arm"]))


async def quality_snapshot(store: Store, window: MonitorWindow, *, prices: Mapping[str, Price] | None = None,
                           confidence: float = 0.95) -> QualitySnapshot:
    """Every quality metric for every group with traffic (or preferences) in either window.

    `prices` maps a model name (or `*`, the fallback) to its price. Two queries; raises StoreError /
    StoreUnavailable from the store.
    """
    params = _params(window, prices or {})
    rows = (await store.query(_inference_sql(z_score(confidence)), params)).to_pylist()
    prefs = (await store.query(_PREFERENCE_SQL, params)).to_pylist()
    periods: tuple[GroupMetrics, GroupMetrics] = ({}, {})
    for row in rows:
        periods[int(row["period"])][_key(row)] = _inference_metrics(row, confidence)
    for row in prefs:
        metrics = periods[int(row["period"])].setdefault(_key(row), {})
        metrics["win_rate"] = _rate(int(row["wins"]), int(row["comparisons"]), confidence)
    return QualitySnapshot(window, current=periods[1], baseline=periods[0])


def estimate_of(metrics: Mapping[str, Estimate] | None, metric: str) -> Estimate:
    """The group's estimate of `metric`, or an empty one (n = 0) when the group has none."""
    if metrics and metric in metrics:
        return metrics[metric]
    return Estimate(kind=METRICS[metric].kind, value=math.nan, n=0, ci=Interval(-math.inf, math.inf))
