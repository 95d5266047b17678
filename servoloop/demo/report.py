"""The demo's findings, read back from the store: held-out satisfaction per version, the event timeline, lineage.

Every figure in the report comes from ClickHouse (chDB here) rows that the running system wrote, never from the
simulator's own counters: satisfaction is the held-out tenant's thumbs (each inference's latest) joined to the
model version that served the inference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from feedback.store import Store

_SATISFACTION_SQL = """
SELECT i.model_version AS version, count() AS n, countIf(f.up) AS up
FROM (SELECT target_id, argMax(thumbs, ts) AS up FROM feedback FINAL
      WHERE tenant = {tenant:String} AND kind = 'thumbs' AND thumbs IS NOT NULL AND user IN {users:Array(String)}
      GROUP BY target_id) AS f
INNER JOIN (SELECT event_id, any(model_version) AS model_version FROM inferences FINAL
            WHERE tenant = {tenant:String} GROUP BY event_id) AS i ON f.target_id = i.event_id
GROUP BY version"""


@dataclass(frozen=True, slots=True)
class Satisfaction:
    """Thumbs-up share of one version's rated answers, with its sample size."""

    version: str
    up: int
    n: int

    @property
    def rate(self) -> float:
        return self.up / self.n if self.n else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "thumbs_up": self.up, "rated": self.n, "rate": round(self.rate, 4)}


async def satisfaction_by_version(store: Store, tenant: str, users: Sequence[str]) -> dict[str, Satisfaction]:
    """Each served version's thumbs-up share among the inferences `users` of `tenant` rated (latest thumbs each)."""
    table = await store.query(_SATISFACTION_SQL, {"tenant": tenant, "users": list(users)})
    return {r["version"]: Satisfaction(r["version"], int(r["up"]), int(r["n"])) for r in table.to_pylist()}


async def timeline(store: Store, model: str, since_ms: int) -> list[dict[str, Any]]:
    """What the loop did, oldest first: drift alerts, triggers, training outcomes and lifecycle changes."""
    events: list[dict[str, Any]] = []
    t = await store.query("SELECT toUnixTimestamp64Milli(ts) AS ts_ms, event_id, actor, reason FROM retrain_triggers FINAL "
                          "WHERE model = {model:String} AND toUnixTimestamp64Milli(ts) >= {since:Int64} ORDER BY ts",
                          {"model": model, "since": since_ms})
    for r in t.to_pylist():
        events.append({"ts_ms": r["ts_ms"], "event": "trigger", "id": r["event_id"], "by": r["actor"],
                       "detail": r["reason"]})
    t = await store.query("SELECT toUnixTimestamp64Milli(ts) AS ts_ms, details FROM monitor_results FINAL "
                          "WHERE monitor = 'retrain_worker' AND toUnixTimestamp64Milli(ts) >= {since:Int64} ORDER BY ts",
                          {"since": since_ms})
    for r in t.to_pylist():
        d = json.loads(r["details"])
        ev = d.get("eval") or {}
        figures = ", ".join(f"{k} {ev[k]:.3f}" for k in ("preference_accuracy", "win_rate", "candidate_judge_score",
                                                         "current_judge_score", "perplexity_ratio")
                            if isinstance(ev.get(k), int | float))
        events.append({"ts_ms": r["ts_ms"], "event": f"trained ({d.get('outcome')})", "id": d.get("version_id", ""),
                       "by": "retrain-worker", "detail": "; ".join([figures, *d.get("reasons", [])]).strip("; "),
                       "trigger_id": d.get("trigger_id", ""), "wall_s": d.get("wall_s"),
                       "train_records": (d.get("dataset") or {}).get("counts", {}).get("train")})
    t = await store.query("SELECT toUnixTimestamp64Milli(ts) AS ts_ms, version_id, state, actor, reason FROM model_events FINAL "
                          "WHERE model = {model:String} AND toUnixTimestamp64Milli(ts) >= {since:Int64} ORDER BY ts",
                          {"model": model, "since": since_ms})
    for r in t.to_pylist():
        events.append({"ts_ms": r["ts_ms"], "event": r["state"], "id": r["version_id"], "by": r["actor"],
                       "detail": r["reason"][:160]})
    t = await store.query("SELECT min(toUnixTimestamp64Milli(ts)) AS ts_ms, monitor, any(details) AS details "
                          "FROM monitor_results FINAL WHERE status = 'alert' AND monitor NOT IN ('retrain_worker', 'canary') "
                          "AND toUnixTimestamp64Milli(ts) >= {since:Int64} GROUP BY monitor", {"since": since_ms})
    for r in t.to_pylist():
        events.append({"ts_ms": r["ts_ms"], "event": "alert", "id": r["monitor"], "by": f"monitor:{r['monitor']}",
                       "detail": "first alert of this monitor"})
    events.sort(key=lambda e: (e["ts_ms"], e["event"]))
    for e in events:
        e["time"] = datetime.fromtimestamp(e["ts_ms"] / 1000, UTC).strftime("%H:%M:%S")
        e["t_s"] = round((e["ts_ms"] - since_ms) / 1000, 1)
    return events


def render_text(report: dict[str, Any]) -> str:
    """The final report as plain text (what the README shows)."""
    s = report["satisfaction"]
    lines = [f"servoloop demo ({report['plan']}, seed {report['seed']}): {report['verdict']}",
             f"wall time {report['wall_s']:.0f} s; {report['traffic']['requests']} requests "
             f"({report['traffic']['http']} HTTP, {report['traffic']['grpc']} gRPC), "
             f"{report['traffic']['feedback_total']} feedback {report['traffic']['feedback']}",
             "",
             "held-out users' satisfaction (thumbs-up share, from ClickHouse):",
             f"  before  {s['before']['version']:<28} {s['before']['rate']:.1%}  (n={s['before']['rated']})"]
    if s.get("after"):
        lines.append(f"  after   {s['after']['version']:<28} {s['after']['rate']:.1%}  (n={s['after']['rated']})")
        lines.append(f"  improvement {s['improvement_pp']:+.1f} percentage points")
    lines += ["", "timeline (seconds since start):"]
    for e in report["timeline"]:
        lines.append(f"  {e['t_s']:>7.1f}s  {e['event']:<22} {str(e['id'])[:36]:<36} {e['by']:<26} {e['detail'][:110]}")
    lines += ["", f"promoted version:  {report.get('promoted') or '-'}",
              f"poisoned version:  {report.get('poisoned') or '-'} ({report.get('poisoned_outcome') or 'none'})"]
    if report.get("poisoned_reasons"):
        lines += [f"  gate: {r}" for r in report["poisoned_reasons"]]
    lineage = report.get("lineage") or {}
    if lineage:
        ds = lineage.get("dataset") or {}
        ev = lineage.get("eval") or {}
        lines += ["", "lineage of the promoted version:",
                  f"  base {lineage.get('base_model')}  parent {lineage.get('parent_version')}  "
                  f"trigger {lineage.get('trigger_id')}",
                  f"  trigger reason: {lineage.get('trigger_reason')}",
                  f"  dataset sha256 {str(ds.get('sha256'))[:16]}…  train pairs {ds.get('counts', {}).get('train')}  "
                  f"feedback rows {(lineage.get('feedback') or {}).get('count')}",
                  f"  gate: preference accuracy {ev.get('preference_accuracy')}, win-rate {ev.get('win_rate')}, "
                  f"perplexity x{ev.get('perplexity_ratio')}",
                  f"  promoted by {lineage.get('promoted_by')}"]
    lines += ["", f"dashboard:        {report['dashboard_url']}  (admin key in {report['admin_key_file']})",
              f"Evidently report: {report.get('evidently_report') or '-'}",
              f"report JSON:      {report.get('report_path') or '-'}"]
    if report.get("screenshot"):
        lines.append(f"screenshot:       {report['screenshot']}")
    return "\n".join(lines)
