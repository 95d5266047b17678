"""What the operator dashboard shows, read from the store as plain JSON-ready data. Every read is exact (FINAL).

Times are epoch milliseconds; a `Span` is the half-open window `[start_ms, end_ms)` plus the bucket width
of time series. Every read takes `tenant`: None covers every tenant (admin keys), a name only that tenant's
rows (what a tenant-scoped key is limited to; the API decides which, feedback/dashboard/api.py).

Contract with the monitors (feedback/monitors: the runner publishes one `MonitorResult` per policy entry,
`monitor` = the entry's name, `details.monitor_kind` = its kind):
- a drift result (`details.monitor_kind == "drift"`, or a `monitor` named `drift…`): `metric` names what
  drifted (`dataset_drift` = share of drifted columns, `prompt_embedding_drift`, or `column:<name>`),
  `value` its score, `threshold` its threshold; `details.drifted` (bool) or a `warn`/`alert` status
  means drifted; `details.column_scores` (`{name: {score, threshold, method, drifted}}`), when present,
  gives the per-feature scores of that run; `details.report` (or `report_path`) is the run's Evidently
  HTML report. Results with `insufficient_data` carry no score and are left out.
- any other result is a quality metric: `details` may hold `ci_low`/`ci_high` (or `ci: [low, high]`); an
  `insufficient_data` result without a sample or an interval has no value (the runner writes 0.0).
- a result with status `alert` (or `warn`) is an alert.
- a canary result (`monitor` = `canary`, feedback/monitors/canary.py) is a decision, not a quality metric:
  the canary panel shows it (`canaries`), the quality charts leave it out.
A version's lineage (`ModelEvent.lineage`) names the trigger that caused it as `trigger_id` (also read:
`retrain_trigger_id`, `trigger_event_id`) = `RetrainTrigger.event_id`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from feedback.store import ParamValue, Store

DRIFT = "(JSONExtractString(details, 'monitor_kind') = 'drift' OR startsWith(monitor, 'drift'))"
COLUMN_PREFIX = "column:"
_TS = ("ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') "
       "AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')")
_MAX_ROWS = 20_000  # a chart cannot show more points than this usefully; reads stop there


@dataclass(frozen=True, slots=True)
class Span:
    start_ms: int
    end_ms: int
    step_s: int

    def params(self, **extra: ParamValue | None) -> dict[str, ParamValue]:
        return {"start_ms": self.start_ms, "end_ms": self.end_ms, "step_s": self.step_s,
                **{k: v for k, v in extra.items() if v is not None}}


def _eq(column: str, value: str | None) -> str:
    return f" AND {column} = {{{column}:String}}" if value is not None else ""


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _interval(details: Mapping[str, Any]) -> tuple[float | None, float | None]:
    low, high = _number(details.get("ci_low")), _number(details.get("ci_high"))
    ci = details.get("ci")
    if (low is None or high is None) and isinstance(ci, list | tuple) and len(ci) == 2:
        low, high = _number(ci[0]), _number(ci[1])
    return low, high


async def _rows(store: Store, sql: str, params: Mapping[str, ParamValue]) -> list[dict[str, Any]]:
    return (await store.query(sql, params)).to_pylist()


# -- overview ---------------------------------------------------------------------------------------------------------

_TABLES = ("inferences", "feedback", "guardrail_verdicts", "monitor_results", "retrain_triggers", "model_events")


async def overview(store: Store, span: Span, *, tenant: str | None = None) -> dict[str, Any]:
    """Events per table: in all, and in the span; and the time of the newest one."""
    where = " WHERE tenant = {tenant:String}" if tenant is not None else ""
    parts = " UNION ALL ".join(
        f"SELECT '{t}' AS table, count() AS total, countIf({_TS}) AS in_span, "
        f"toUnixTimestamp64Milli(max(ts)) AS last_ms FROM {t} FINAL{where}" for t in _TABLES)
    rows = await _rows(store, parts, span.params(tenant=tenant))
    return {r["table"]: {"total": r["total"], "in_span": r["in_span"], "last_ms": r["last_ms"] if r["total"] else None}
            for r in rows}


# -- quality metrics and drift (monitor_results) ---------------------------------------------------------------------

_RESULT_COLUMNS = """tenant, monitor, metric, model, model_version, value, threshold, status, sample_size, details,
    toUnixTimestamp64Milli(window_start) AS window_start_ms, toUnixTimestamp64Milli(window_end) AS window_end_ms,
    toUnixTimestamp64Milli(ts) AS ts_ms, event_id"""


async def quality_series(store: Store, span: Span, *, metric: str | None = None,
                         model: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
    """Quality metric time series, one per (tenant, monitor, metric, model, version), points by window end.

    A window evaluated more than once shows its latest result. Each point carries its confidence interval
    (None where the monitor gave none), sample size, threshold and status.
    """
    sql = f"""
        SELECT {_RESULT_COLUMNS} FROM monitor_results FINAL
        WHERE {_TS} AND NOT {DRIFT} AND monitor != 'canary'{_eq("metric", metric)}{_eq("model", model)}{_eq("tenant", tenant)}
        ORDER BY tenant, monitor, metric, model, model_version, window_end, ts DESC
        LIMIT 1 BY tenant, monitor, metric, model, model_version, window_start, window_end
        LIMIT {_MAX_ROWS}"""
    series: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in await _rows(store, sql, span.params(metric=metric, model=model, tenant=tenant)):
        key = (r["tenant"], r["monitor"], r["metric"], r["model"], r["model_version"])
        s = series.setdefault(key, {"tenant": r["tenant"], "monitor": r["monitor"], "metric": r["metric"],
                                    "model": r["model"], "model_version": r["model_version"], "points": []})
        low, high = _interval(_json(r["details"]))
        no_value = r["status"] == "insufficient_data" and (r["sample_size"] == 0 or (low is None and high is None))
        s["points"].append({"t": r["window_end_ms"], "window_start_ms": r["window_start_ms"],
                            "value": None if no_value else r["value"],
                            "ci_low": low, "ci_high": high, "sample_size": r["sample_size"],
                            "threshold": r["threshold"], "status": r["status"]})
    return list(series.values())


async def drift_scores(store: Store, span: Span, *, model: str | None = None,
                       tenant: str | None = None) -> list[dict[str, Any]]:
    """The latest drift score per (tenant, feature, model, version) within the span, sorted by those.

    A feature is a drift result's own metric or one of its `column_scores`; the newest run wins.
    `report_path` is the run's HTML report as the monitor wrote it (the API turns it into a link).
    """
    sql = f"""
        SELECT {_RESULT_COLUMNS} FROM monitor_results FINAL
        WHERE {_TS} AND {DRIFT} AND status != 'insufficient_data'{_eq("model", model)}{_eq("tenant", tenant)}
        ORDER BY tenant, monitor, metric, model, model_version, ts DESC
        LIMIT 1 BY tenant, monitor, metric, model, model_version
        LIMIT {_MAX_ROWS}"""
    latest: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in await _rows(store, sql, span.params(model=model, tenant=tenant)):
        details = _json(r["details"])
        report = next((details[k] for k in ("report", "report_path") if isinstance(details.get(k), str)), None)
        run = {"tenant": r["tenant"], "monitor": r["monitor"], "metric": r["metric"], "model": r["model"],
               "model_version": r["model_version"], "sample_size": r["sample_size"], "ts_ms": r["ts_ms"],
               "window_start_ms": r["window_start_ms"], "window_end_ms": r["window_end_ms"],
               "report_path": report or None}
        drifted = details.get("drifted")
        features = [{**run, "feature": r["metric"].removeprefix(COLUMN_PREFIX), "score": r["value"],
                     "threshold": r["threshold"], "status": r["status"], "method": details.get("method"),
                     "drifted": drifted if isinstance(drifted, bool) else r["status"] in ("warn", "alert")}]
        columns = details.get("column_scores")
        for name, col in (columns.items() if isinstance(columns, dict) else ()):
            if isinstance(col, dict) and _number(col.get("score")) is not None:
                flag = col.get("drifted") is True
                features.append({**run, "feature": str(name), "score": _number(col["score"]),
                                 "threshold": _number(col.get("threshold")), "method": col.get("method"),
                                 "drifted": flag, "status": "warn" if flag else "ok"})
        for f in features:
            key = (f["tenant"], f["model"], f["model_version"], f["feature"])
            if key not in latest or latest[key]["ts_ms"] < f["ts_ms"]:
                latest[key] = f
    return sorted(latest.values(), key=lambda d: (d["model"], d["model_version"], d["feature"], d["tenant"]))


async def alerts(store: Store, span: Span, *, statuses: tuple[str, ...] = ("alert",),
                 limit: int = 100, tenant: str | None = None) -> list[dict[str, Any]]:
    """Monitor results with one of `statuses` in the span, newest first."""
    sql = f"""
        SELECT {_RESULT_COLUMNS} FROM monitor_results FINAL
        WHERE {_TS} AND status IN {{statuses:Array(String)}}{_eq("tenant", tenant)}
        ORDER BY ts DESC, event_id LIMIT {{limit:UInt64}}"""
    rows = await _rows(store, sql, span.params(statuses=list(statuses), limit=limit, tenant=tenant))
    for r in rows:
        r["details"] = _json(r["details"])
    return rows


# -- guardrails, latency and cost ------------------------------------------------------------------------------------

_BUCKET = "toInt64(toUnixTimestamp(toStartOfInterval(ts, toIntervalSecond({step_s:UInt32}), 'UTC'))) * 1000"


async def guardrail_rates(store: Store, span: Span, *, model: str | None = None,
                          tenant: str | None = None) -> dict[str, Any]:
    """Per time bucket: verdicts, and the share of verdicts per action and per finding type.

    A verdict with several findings of one type counts once for that type (`findings` counts them all).
    """
    where = f"{_TS}{_eq('model', model)}{_eq('tenant', tenant)}"
    totals = await _rows(store, f"""
        SELECT {_BUCKET} AS t, count() AS verdicts, countIf(action = 'block') AS blocks,
               countIf(action = 'redact') AS redacts
        FROM guardrail_verdicts FINAL WHERE {where} GROUP BY t ORDER BY t""", span.params(model=model, tenant=tenant))
    by_type = await _rows(store, f"""
        SELECT {_BUCKET} AS t, finding.1 AS type, count() AS verdicts, sum(finding.2) AS findings,
               countIf(action = 'block') AS blocks
        FROM guardrail_verdicts FINAL ARRAY JOIN CAST(finding_counts, 'Array(Tuple(String, UInt32))') AS finding
        WHERE {where} AND finding.2 > 0 GROUP BY t, type ORDER BY type, t""", span.params(model=model, tenant=tenant))
    per_bucket = {r["t"]: r["verdicts"] for r in totals}
    actions = {a: [{"t": r["t"], "count": r[f"{a}s"], "rate": r[f"{a}s"] / r["verdicts"]} for r in totals]
               for a in ("block", "redact")}
    types: dict[str, list[dict[str, Any]]] = {}
    for r in by_type:
        types.setdefault(r["type"], []).append({"t": r["t"], "count": r["verdicts"], "findings": r["findings"],
                                                "blocks": r["blocks"], "rate": r["verdicts"] / per_bucket[r["t"]]})
    return {"buckets": [{"t": r["t"], "verdicts": r["verdicts"]} for r in totals],
            "actions": actions, "types": [{"type": k, "points": v} for k, v in types.items()]}


async def latency_cost(store: Store, span: Span, *, model: str | None = None,
                       prices: Mapping[str, tuple[float, float]] | None = None,
                       tenant: str | None = None) -> list[dict[str, Any]]:
    """Per model and time bucket: requests, errors, latency and TTFT percentiles (ms), tokens, and cost.

    `prices` maps a model (or `*`, the fallback) to (price per 1k input tokens, per 1k output tokens);
    cost is None for a model without a price.
    """
    rows = await _rows(store, f"""
        SELECT model, {_BUCKET} AS t, count() AS requests, countIf(status = 'error') AS errors,
               quantilesExact(0.5, 0.95, 0.99)(latency_ms) AS latency,
               quantilesExact(0.5, 0.95)(ttft_ms) AS ttft,
               sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out
        FROM inferences FINAL WHERE {_TS}{_eq("model", model)}{_eq("tenant", tenant)} AND NOT shadow
        GROUP BY model, t ORDER BY model, t""", span.params(model=model, tenant=tenant))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        price = (prices or {}).get(r["model"], (prices or {}).get("*"))
        cost = None if price is None else r["tokens_in"] / 1000 * price[0] + r["tokens_out"] / 1000 * price[1]
        p50, p95, p99 = r["latency"]
        series.setdefault(r["model"], []).append({
            "t": r["t"], "requests": r["requests"], "errors": r["errors"], "error_rate": r["errors"] / r["requests"],
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "ttft_p50_ms": r["ttft"][0], "ttft_p95_ms": r["ttft"][1],
            "tokens_in": r["tokens_in"], "tokens_out": r["tokens_out"], "cost": cost})
    return [{"model": m, "points": p} for m, p in series.items()]


async def spend_series(store: Store, span: Span, *, tenant: str | None = None) -> list[dict[str, Any]]:
    """Spend (`cost_usd`, recorded by the gateway) per tenant and time bucket, with requests and tokens."""
    rows = await _rows(store, f"""
        SELECT toString(tenant) AS tenant, {_BUCKET} AS t, sum(cost_usd) AS cost_usd, count() AS requests,
               sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out
        FROM inferences FINAL WHERE {_TS}{_eq("tenant", tenant)}
        GROUP BY tenant, t ORDER BY tenant, t""", span.params(tenant=tenant))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(r.pop("tenant"), []).append(r)
    return [{"tenant": k, "total_usd": sum(p["cost_usd"] for p in v), "points": v} for k, v in series.items()]


async def tenants(store: Store) -> list[str]:
    """Every tenant the store knows: served requests, monitor results, versions and budgets."""
    rows = await _rows(store, """
        SELECT DISTINCT toString(tenant) AS tenant FROM (
            SELECT DISTINCT tenant FROM inferences UNION ALL SELECT DISTINCT tenant FROM monitor_results
            UNION ALL SELECT DISTINCT tenant FROM model_events UNION ALL SELECT DISTINCT tenant FROM budgets)
        WHERE tenant != '' ORDER BY tenant""", {})
    return [r["tenant"] for r in rows]


# -- model versions and the triggers behind them ---------------------------------------------------------------------

_TRIGGER_COLUMNS = """event_id, toUnixTimestamp64Milli(ts) AS ts_ms, tenant, model, model_version, method, reason,
    monitor_event_id, toUnixTimestamp64Milli(window_start) AS window_start_ms,
    toUnixTimestamp64Milli(window_end) AS window_end_ms, actor, params"""
_LINEAGE_TRIGGER_KEYS = ("trigger_id", "retrain_trigger_id", "trigger_event_id")


async def triggers(store: Store, span: Span, *, model: str | None = None, limit: int = 100,
                   tenant: str | None = None) -> list[dict[str, Any]]:
    """Retrain triggers in the span, newest first, `params` parsed."""
    rows = await _rows(store, f"""
        SELECT {_TRIGGER_COLUMNS} FROM retrain_triggers FINAL WHERE {_TS}{_eq("model", model)}{_eq("tenant", tenant)}
        ORDER BY ts DESC, event_id LIMIT {{limit:UInt64}}""", span.params(model=model, limit=limit, tenant=tenant))
    for r in rows:
        r["params"] = _json(r["params"])
    return rows


async def model_timeline(store: Store, *, model: str | None = None, limit: int = 5000,
                         tenant: str | None = None) -> list[dict[str, Any]]:
    """Every model with its versions (newest first), each with its lifecycle events and the trigger behind it.

    With `tenant`, only that tenant's rows and the global ones (tenant ''): the versions that serve it.

    A version's `state` is its latest lifecycle state; `requested` lists operator requests
    (`<action>_requested` events) not followed by a real state change nor refused by the registry
    (`request_refused`, retrain/requests.py).
    """
    events = await _rows(store, f"""
        SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms, tenant, model, version_id, base_model, adapter_path,
               state, previous_state, reason, actor, lineage
        FROM model_events FINAL WHERE 1{_eq("model", model)}{" AND tenant IN ('', {tenant:String})" if tenant else ""}
        ORDER BY ts DESC, event_id DESC LIMIT {{limit:UInt64}}""",
                         {"limit": limit, **({"model": model} if model else {}), **({"tenant": tenant} if tenant else {})})
    versions: dict[tuple[str, str], dict[str, Any]] = {}
    for e in reversed(events):  # oldest first
        v = versions.setdefault((e["model"], e["version_id"]), {
            "model": e["model"], "version_id": e["version_id"], "state": None, "requested": [], "events": [],
            "lineage": {}, "trigger_id": None, "trigger": None, "base_model": "", "adapter_path": ""})
        lineage = _json(e["lineage"])
        v["events"].append({"event_id": e["event_id"], "ts_ms": e["ts_ms"], "state": e["state"],
                            "previous_state": e["previous_state"], "reason": e["reason"], "actor": e["actor"]})
        if e["state"].endswith("_requested"):
            v["requested"].append(e["state"].removesuffix("_requested"))
            continue
        if e["state"] == "request_refused":  # the registry's answer to a request it could not apply: no state
            refused = str(lineage.get("requested", "")).removesuffix("_requested")
            if refused in v["requested"]:
                v["requested"].remove(refused)
            continue
        v["state"], v["requested"] = e["state"], []
        v["lineage"] = lineage or v["lineage"]
        v["base_model"], v["adapter_path"] = e["base_model"] or v["base_model"], e["adapter_path"] or v["adapter_path"]
        for key in _LINEAGE_TRIGGER_KEYS:
            if isinstance(lineage.get(key), str) and lineage[key]:
                v["trigger_id"] = lineage[key]
    wanted = sorted({v["trigger_id"] for v in versions.values() if v["trigger_id"]})
    if wanted:
        rows = await _rows(store, f"SELECT {_TRIGGER_COLUMNS} FROM retrain_triggers FINAL "
                                  "WHERE event_id IN {ids:Array(String)}", {"ids": wanted})
        by_id = {r["event_id"]: r | {"params": _json(r["params"])} for r in rows}
        for v in versions.values():
            v["trigger"] = by_id.get(v["trigger_id"])
    models: dict[str, list[dict[str, Any]]] = {}
    for v in sorted(versions.values(), key=lambda v: v["events"][0]["ts_ms"], reverse=True):
        models.setdefault(v["model"], []).append(v)
    return [{"model": m, "versions": vs} for m, vs in sorted(models.items())]


async def version_state(store: Store, model: str, version_id: str) -> dict[str, Any] | None:
    """The latest lifecycle event of one version (operator requests aside), or None if it has none."""
    rows = await _rows(store, """
        SELECT state, base_model, adapter_path, tenant FROM model_events FINAL
        WHERE model = {model:String} AND version_id = {version_id:String}
        ORDER BY NOT (endsWith(state, '_requested') OR state = 'request_refused') DESC, ts DESC, event_id DESC
        LIMIT 1""",
                       {"model": model, "version_id": version_id})
    return rows[0] if rows else None


# -- canaries ----------------------------------------------------------------------------------------------------------


async def canaries(store: Store, *, now_ms: int, model: str | None = None) -> list[dict[str, Any]]:
    """Every version in `canary` now: both arms side by side over its lifetime (read live), and the canary
    monitor's latest decision for it (None before its first cycle), with that decision's checks and reasons."""
    from feedback.monitors.canary import MONITOR, arm_stats, arm_summary, canary_versions

    versions = [v for v in await canary_versions(store, now_ms=now_ms) if model is None or v.model == model]
    if not versions:
        return []
    decided = await _rows(store, f"""
        SELECT {_RESULT_COLUMNS} FROM monitor_results FINAL
        WHERE monitor = {{monitor:String}} AND model IN {{models:Array(String)}}
        ORDER BY model, model_version, ts DESC, event_id DESC
        LIMIT 1 BY model, model_version""", {"monitor": MONITOR, "models": sorted({v.model for v in versions})})
    latest = {(r["model"], r["model_version"]): r for r in decided}
    out = []
    for v in versions:
        canary, active = await arm_stats(store, v, now_ms=now_ms)
        r = latest.get((v.model, v.version_id))
        details = _json(r["details"]) if r is not None and r["ts_ms"] >= v.since_ms else None
        decision = None if details is None or r is None else {
            "action": details.get("decision"), "status": r["status"], "ts_ms": r["ts_ms"],
            "reasons": details.get("reasons", []), "checks": details.get("checks", []),
            "requested": details.get("requested"), "request_skipped": details.get("request_skipped"),
            "event_id": r["event_id"]}
        out.append({"model": v.model, "version_id": v.version_id, "active_version": v.active_version,
                    "since_ms": v.since_ms, "canary_share": v.canary_share, "requested": list(v.requested),
                    "arms": {"canary": arm_summary(canary), "active": arm_summary(active)}, "decision": decision})
    return out
