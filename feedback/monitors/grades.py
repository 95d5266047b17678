"""The `grade` monitor kind: any grader's grades as a monitor metric, per tenant / model / model version.

    - name: toxicity_rise
      kind: grade
      metric: toxicity_rate            # a name below, or `grade:<grader>:<label>` (rate) / `grade:<grader>:score` (mean)
      threshold: 0.02                  # with compare: baseline, 2 points more toxic than the baseline (and significant)
      worse: increase                  # the default; set `decrease` for judge scores and win rates

The statistics are the quality monitors' own (feedback/monitors/evaluate.py): a label rate is a binomial
rate with a Wilson interval (two-proportion z-test against the baseline, binomial test against a fixed
threshold); a score is a mean with a t interval (Welch's t-test / one-sample t). Each inference counts
once per grader, by its latest grade, in the window of the inference (as feedback does), so a
re-graded inference or a redelivered grade never counts twice. The runner applies hysteresis, cooldown
and actions to these results like to any monitor's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import msgspec

from feedback.monitors.base import MonitorWindow
from feedback.monitors.evaluate import evaluate
from feedback.monitors.quality import Estimate
from feedback.monitors.stats import corrected_alpha, t_interval, wilson_interval
from feedback.store.base import Store
from schemas.events import MonitorResult

if TYPE_CHECKING:
    from feedback.monitors.policy import MonitorPolicy

# Named grade metrics: (grader, label whose rate is measured, or None for the mean score).
GRADE_METRICS: dict[str, tuple[str, str | None]] = {
    "toxicity_rate": ("toxicity", "toxic"),
    "hallucination_rate": ("groundedness", "hallucinated"),
    "unsupported_claim_share": ("groundedness", None),
    "inconsistency_rate": ("self_consistency", "inconsistent"),
    "judge_fail_rate": ("judge", "fail"),
    "judge_score": ("judge", None),
    "pairwise_win_rate": ("judge_pairwise", None),  # mean of 1 / 0.5 / 0: ties count half
}
_STATUS = {"breach": "alert", "elevated": "warn", "normal": "ok", "insufficient_data": "insufficient_data"}

_SQL = """
    WITH latest AS (
        SELECT tenant, model, model_version, target_id,
               argMax(label, (ts, event_id)) AS label, argMax(score, (ts, event_id)) AS score,
               argMax(inference_ts, (ts, event_id)) AS its
        FROM grades FINAL
        WHERE grader = {grader:String}
          AND inference_ts >= fromUnixTimestamp64Milli({span_start:Int64}, 'UTC')
          AND inference_ts < fromUnixTimestamp64Milli({span_end:Int64}, 'UTC')
        GROUP BY tenant, model, model_version, target_id
    )
    SELECT multiIf(its >= fromUnixTimestamp64Milli({cur_start:Int64}, 'UTC')
                       AND its < fromUnixTimestamp64Milli({cur_end:Int64}, 'UTC'), 1,
                   its >= fromUnixTimestamp64Milli({base_start:Int64}, 'UTC')
                       AND its < fromUnixTimestamp64Milli({base_end:Int64}, 'UTC'), 0, -1) AS period,
           tenant, model, model_version, count() AS n, countIf(label = {label:String}) AS hits,
           avg(score) AS mean, varSamp(score) AS var
    FROM latest
    GROUP BY period, tenant, model, model_version
    HAVING period >= 0"""


def grade_metric(metric: str, params: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """(grader, label or None for the mean score) that a policy entry's `metric` (and `params`) names.

    Raises ValueError for a metric that is neither a named grade metric nor `grade:<grader>:<label|score>`.
    """
    params = params or {}
    if "grader" in params:
        label = params.get("label")
        return str(params["grader"]), None if label in (None, "", "score") else str(label)
    if metric in GRADE_METRICS:
        return GRADE_METRICS[metric]
    parts = metric.split(":")
    if len(parts) == 3 and parts[0] == "grade" and parts[1] and parts[2]:
        return parts[1], None if parts[2] == "score" else parts[2]
    raise ValueError(f"unknown grade metric {metric!r}; one of {sorted(GRADE_METRICS)} or grade:<grader>:<label|score>")


def _estimate(row: dict[str, Any] | None, label: str | None, confidence: float) -> Estimate:
    n = int(row["n"]) if row else 0
    if label is not None:
        hits = int(row["hits"]) if row else 0
        return Estimate(kind="rate", value=hits / n if n else math.nan, n=n,
                        ci=wilson_interval(hits, n, confidence), successes=hits)
    mean = float(row["mean"]) if row and n else math.nan
    var = float(row["var"]) if row and n > 1 and row["var"] is not None else math.nan
    return Estimate(kind="mean", value=mean, n=n, ci=t_interval(mean, var, n, confidence), variance=var)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class GradeMonitor:
    """Monitor of kind `grade` (see the module docstring). One MonitorResult per group with grades now."""

    kind = "grade"

    async def run(self, store: Store, window: MonitorWindow, policy: MonitorPolicy) -> list[MonitorResult]:
        grader, label = grade_metric(policy.metric, policy.params)
        span = window.span
        rows = (await store.query(_SQL, {
            "grader": grader, "label": label or "", "span_start": span.start_ms, "span_end": span.end_ms,
            "cur_start": window.current.start_ms, "cur_end": window.current.end_ms,
            "base_start": window.baseline.start_ms, "base_end": window.baseline.end_ms})).to_pylist()
        periods: tuple[dict[tuple[str, str, str], dict[str, Any]], ...] = ({}, {})
        for r in rows:
            periods[int(r["period"])][(r["tenant"], r["model"], r["model_version"])] = r
        current, baseline = periods[1], periods[0]
        groups = sorted(g for g in current if policy.applies_to(g[0], g[1]))
        pairs = [(g, _estimate(current[g], label, policy.confidence),
                  _estimate(baseline.get(g), label, policy.confidence)) for g in groups]
        tests = sum(1 for _, c, b in pairs
                    if c.n >= policy.min_samples and (policy.compare == "threshold" or b.n >= policy.min_samples))
        alpha = policy.alpha if policy.correction == "none" else corrected_alpha(policy.alpha, tests=tests)
        out = []
        for (tenant, model, version), cur, base in pairs:
            ev = evaluate(policy, cur, base if policy.compare == "baseline" else None, alpha=alpha)
            details = {
                "grader": grader, "label": label, "kind": cur.kind, "compare": policy.compare, "worse": policy.worse,
                "baseline": _finite(ev.baseline), "baseline_sample_size": ev.n_baseline,
                "ci_low": _finite(ev.ci.low), "ci_high": _finite(ev.ci.high),
                "deterioration": _finite(ev.deterioration), "p_value": _finite(ev.p_value),
                "alpha_corrected": alpha, "significant": ev.significant, "reason": ev.decision.reason,
            }
            out.append(MonitorResult(
                tenant=tenant, monitor=policy.name, metric=policy.metric, model=model, model_version=version,
                window_start_ms=window.current.start_ms, window_end_ms=window.current.end_ms,
                value=_finite(ev.value) or 0.0, threshold=policy.threshold, status=_STATUS[ev.decision.level],  # type: ignore[arg-type]
                sample_size=min(cur.n, 2**32 - 1), details=msgspec.json.encode(details).decode()))
        return out
