"""Lineage: from a served response back to the trigger, dataset and feedback that produced its adapter.

    inference id ─▶ `inferences` row (model, model_version)
                 ─▶ that version's `model_events` rows (state history; lineage JSON)
                 ─▶ `retrain_triggers` row (lineage.trigger_id) ─▶ its `monitor_results` row (monitor evidence)
                 ─▶ the dataset snapshot (lineage.dataset) ─▶ the `feedback` rows it was built from

The lineage JSON a version is registered with (`Registry.register_candidate(lineage=...)`; the training
worker fills it; every key optional, unknown keys kept):

    {
      "base_model": "tiny-chat",                 # what the adapter applies to (also a ModelEvent column)
      "parent_version": "v20261120-…" | "base",  # the version that was active when training started
      "trigger_id": "<RetrainTrigger.event_id>", # absent for a manual `servoloop train`
      "recipe": {"name": "dpo-lora", "method": "dpo", "hyperparameters": {...}, "lora": {...}},
      "dataset": {
        "sha256": "<content hash of the snapshot>",
        "path": "<Parquet snapshot, local path or fsspec URL>",
        "window_start_ms": 0, "window_end_ms": 0,  # the feedback window it was built from
        "feedback_ids": ["<FeedbackEvent.event_id>", ...],  # optional: exactly the rows used
        "query": "<how to rebuild it: the builder's filter description or SQL>",
        "tenant": "...", "counts": {...}            # optional
      },
      "eval": {"passed": true, "metrics": {...}, "reasons": [...]},
      "job": {...}                                # optional: job id, wall time, host
    }

The registry adds `artifact_sha256`, `adapter_path`, `registered_by`, `registered_ms`, and one entry per
lifecycle step (`canary`, `promotion`, `rollback`, `rejection`, `retirement`, `reactivation`: by, ts_ms,
reason, evidence): who or what promoted it is `promotion.by`.

Source feedback rows: the listed `feedback_ids` when present, else the model's rated inferences of the
`parent_version` (any version if absent) whose feedback falls in the dataset window.
"""

from __future__ import annotations

import json
from typing import Any

from feedback.store import Store
from feedback.store.base import in_ids
from retrain.registry import get_version, model_rows, parse_lineage
from schemas.errors import NotFound

FEEDBACK_LIMIT = 200
"""Source feedback rows returned with a lineage (the total count is always exact)."""

_FEEDBACK_COLUMNS = ("f.event_id AS event_id, toUnixTimestamp64Milli(f.ts) AS ts_ms, f.tenant AS tenant, "
                     "f.target_id AS target_id, f.kind AS kind, f.metric_name AS metric_name, f.thumbs AS thumbs, "
                     "f.rating AS rating, f.comment AS comment, f.correction AS correction, "
                     "f.preferred_id AS preferred_id, f.other_id AS other_id")


async def _rows(store: Store, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    return (await store.query(sql, params)).to_pylist()


async def trigger_row(store: Store, trigger_id: str) -> dict[str, Any] | None:
    """The `retrain_triggers` row `trigger_id` (params parsed), or None."""
    rows = await _rows(store, """
        SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms, tenant, model, model_version, method, reason,
               monitor_event_id, toUnixTimestamp64Milli(window_start) AS window_start_ms,
               toUnixTimestamp64Milli(window_end) AS window_end_ms, actor, params
        FROM retrain_triggers FINAL WHERE event_id = {id:String} LIMIT 1""", {"id": trigger_id})
    if not rows:
        return None
    return rows[0] | {"params": parse_lineage(rows[0]["params"])}


async def monitor_row(store: Store, event_id: str) -> dict[str, Any] | None:
    """The `monitor_results` row `event_id` (details parsed): the evidence behind a trigger."""
    rows = await _rows(store, """
        SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms, monitor, metric, model, model_version,
               toUnixTimestamp64Milli(window_start) AS window_start_ms,
               toUnixTimestamp64Milli(window_end) AS window_end_ms, value, threshold, status, sample_size, details
        FROM monitor_results FINAL WHERE event_id = {id:String} LIMIT 1""", {"id": event_id})
    if not rows:
        return None
    return rows[0] | {"details": parse_lineage(rows[0]["details"])}


async def source_feedback(store: Store, model: str, dataset: dict[str, Any], *, parent_version: str = "",
                          limit: int = FEEDBACK_LIMIT) -> dict[str, Any]:
    """The feedback rows a dataset was built from: `{"source", "count", "rows"}` (rows capped at `limit`)."""
    ids = [i for i in dataset.get("feedback_ids") or [] if isinstance(i, str)]
    if ids:
        where, params = f"f.event_id IN {in_ids('ids')}", {"ids": ids}
        source, join = "feedback_ids", ""
    elif isinstance(dataset.get("window_start_ms"), int) and isinstance(dataset.get("window_end_ms"), int):
        where = ("f.ts >= fromUnixTimestamp64Milli({start:Int64}, 'UTC') AND f.ts < fromUnixTimestamp64Milli("
                 "{end:Int64}, 'UTC') AND i.model = {model:String}")
        params = {"start": dataset["window_start_ms"], "end": dataset["window_end_ms"], "model": model}
        if parent_version:
            where += " AND i.model_version = {version:String}"
            params["version"] = parent_version
        if isinstance(dataset.get("tenant"), str) and dataset["tenant"]:
            where += " AND f.tenant = {tenant:String}"
            params["tenant"] = dataset["tenant"]
        source = "window"
        join = " INNER JOIN (SELECT event_id, tenant, model, model_version FROM inferences FINAL) AS i " \
               "ON i.event_id = f.target_id AND i.tenant = f.tenant"
    else:
        return {"source": None, "count": 0, "rows": []}
    base = f"FROM feedback AS f FINAL{join} WHERE {where}"
    count = (await _rows(store, f"SELECT count() AS n {base}", params))[0]["n"]
    rows = await _rows(store, f"SELECT {_FEEDBACK_COLUMNS} {base} ORDER BY f.ts, f.event_id LIMIT {{limit:UInt64}}",
                       params | {"limit": limit})
    return {"source": source, "count": int(count), "rows": rows}


async def version_lineage(store: Store, model: str, version_id: str) -> dict[str, Any]:
    """A version's full lineage: its view, its history, parent, trigger and monitor evidence, dataset, feedback.

    Raises NotFound for an unknown model or version.
    """
    view = await get_version(store, model, version_id)
    history = []
    for r in await model_rows(store, model, version_id):
        lineage = parse_lineage(r["lineage"])
        history.append({k: r[k] for k in ("event_id", "ts_ms", "state", "previous_state", "reason", "actor")}
                       | {"request_id": lineage.get("request_id", "")})
    lineage = view.lineage
    trigger_id = next((lineage[k] for k in ("trigger_id", "retrain_trigger_id", "trigger_event_id")
                       if isinstance(lineage.get(k), str) and lineage[k]), "")
    trigger = await trigger_row(store, trigger_id) if trigger_id else None
    monitor = await monitor_row(store, trigger["monitor_event_id"]) if trigger and trigger["monitor_event_id"] else None
    dataset = lineage.get("dataset") if isinstance(lineage.get("dataset"), dict) else {}
    parent = str(lineage.get("parent_version") or "")
    parent_view = None
    if parent:
        try:
            p = await get_version(store, model, parent)
            parent_view = {"version_id": p.version_id, "state": p.state, "artifact_sha256": p.artifact_sha256}
        except NotFound:
            parent_view = {"version_id": parent, "state": None}
    return {
        "model": model, "version_id": view.version_id, "state": view.state, "base_model": view.base_model,
        "adapter_path": view.adapter_path, "artifact_sha256": view.artifact_sha256,
        "canary_share": view.canary_share, "updated_ms": view.updated_ms,
        "promoted_by": (lineage.get("promotion") or {}).get("by") if isinstance(lineage.get("promotion"), dict) else None,
        "lineage": lineage, "history": history, "parent": parent_view,
        "trigger_id": trigger_id or None, "trigger": trigger, "monitor_result": monitor, "dataset": dataset,
        "feedback": await source_feedback(store, model, dataset, parent_version=parent if parent != "base" else "")
        if dataset else {"source": None, "count": 0, "rows": []},
    }


async def inference_lineage(store: Store, inference_id: str) -> dict[str, Any]:
    """The lineage of the version that served `inference_id`; raises NotFound for an unknown inference.

    An inference served by a version the registry has no rows for (the base model before any adapter)
    gets `version: null` and a note.
    """
    rows = await _rows(store, """
        SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms, tenant, model, model_version, adapter, canary_arm,
               engine, status
        FROM inferences FINAL WHERE event_id = {id:String} LIMIT 1""", {"id": inference_id})
    if not rows:
        raise NotFound(f"no inference {inference_id!r}", param="inference_id")
    inference = rows[0]
    out: dict[str, Any] = {"inference": inference, "version": None, "note": ""}
    version = inference["model_version"] or "base"
    try:
        out["version"] = await version_lineage(store, inference["model"], version)
    except NotFound as e:
        out["note"] = f"version {version!r} of {inference['model']!r} is not in the registry ({e.message})"
    return out


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, sort_keys=False)
