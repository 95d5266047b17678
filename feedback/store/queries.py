"""Typed reads over the event tables. Every read is exact: FINAL (or argMax) collapses redelivered events.

Windows are half-open `[start_ms, end_ms)` in epoch milliseconds on the event's own `ts`. `tenant=None`
means every tenant (monitors, admin); anything a client can reach must pass its own tenant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from feedback.store.base import ParamValue, Store, identifier
from feedback.store.columns import from_arrow, select_list
from schemas.events import DeadLetter, FeedbackEvent, InferenceEvent

_WINDOW = ("ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') "
           "AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')")


def _where(start_ms: int, end_ms: int, **equals: str | None) -> tuple[str, dict[str, ParamValue]]:
    """A window plus `column = value` for every value given (None: no filter), with its parameters."""
    clauses, params = [_WINDOW], {"start_ms": start_ms, "end_ms": end_ms}
    for column, value in equals.items():
        if value is not None:
            clauses.append(f"{identifier(column)} = {{{column}:String}}")
            params[column] = value
    return " AND ".join(clauses), params  # type: ignore[return-value]


async def count_rows(store: Store, table: str, *, tenant: str | None = None) -> int:
    """Exact number of distinct events in `table` (FINAL), optionally for one tenant."""
    where, params = ("WHERE tenant = {tenant:String}", {"tenant": tenant}) if tenant is not None else ("", {})
    result = await store.query(f"SELECT count() AS n FROM {identifier(table)} FINAL {where}", params)
    return int(result.column("n")[0].as_py())


async def inferences_in_window(store: Store, *, start_ms: int, end_ms: int, tenant: str | None = None,
                               model: str | None = None, model_version: str | None = None,
                               limit: int | None = None) -> list[InferenceEvent]:
    """Inferences with `start_ms <= ts < end_ms`, oldest first, optionally for one tenant/model/version."""
    where, params = _where(start_ms, end_ms, tenant=tenant, model=model, model_version=model_version)
    sql = f"SELECT * FROM inferences FINAL WHERE {where} ORDER BY ts, event_id"
    if limit is not None:
        sql += " LIMIT {limit:UInt64}"
        params["limit"] = limit
    return from_arrow(InferenceEvent, await store.query(sql, params))  # type: ignore[return-value]


async def get_inferences(store: Store, *, tenant: str, event_ids: Sequence[str]) -> dict[str, InferenceEvent]:
    """The inferences of `tenant` among `event_ids`, by id. Ids of other tenants are simply absent."""
    if not event_ids:
        return {}
    table = await store.query(
        "SELECT * FROM inferences FINAL WHERE tenant = {tenant:String} AND event_id IN {ids:Array(String)}",
        {"tenant": tenant, "ids": list(event_ids)})
    return {e.event_id: e for e in from_arrow(InferenceEvent, table)}  # type: ignore[misc]


async def get_inference(store: Store, *, tenant: str, event_id: str) -> InferenceEvent | None:
    """The inference `event_id` if it belongs to `tenant`, else None (another tenant's id looks absent).

    This is the feedback authorization check: a key may rate only its own tenant's inferences.
    """
    return (await get_inferences(store, tenant=tenant, event_ids=[event_id])).get(event_id)


class RatedInference(msgspec.Struct, frozen=True):
    """One feedback event with the inference it rates."""

    feedback: FeedbackEvent
    inference: InferenceEvent


async def feedback_with_inferences(store: Store, *, start_ms: int, end_ms: int, tenant: str | None = None,
                                   metric_name: str | None = None, kind: str | None = None,
                                   model: str | None = None,
                                   model_version: str | None = None) -> list[RatedInference]:
    """Feedback with `ts` in the window, each joined to its target inference of the same tenant, oldest first.

    Feedback whose target is missing (or another tenant's) is left out. Client retries carrying the same
    `idempotency_key` count once (the first).
    """
    where, params = _where(start_ms, end_ms, tenant=tenant, metric_name=metric_name, kind=kind)
    inf_filter = "".join(f" AND {c} = {{{c}:String}}" for c, v in
                         (("model", model), ("model_version", model_version)) if v is not None)
    params |= {k: v for k, v in (("model", model), ("model_version", model_version)) if v is not None}
    sql = f"""
        SELECT {select_list(FeedbackEvent, "f", "f__")}, {select_list(InferenceEvent, "i", "i__")}
        FROM (
            SELECT * FROM feedback FINAL WHERE {where}
            ORDER BY ts, event_id
            LIMIT 1 BY tenant, if(idempotency_key = '', event_id, idempotency_key)
        ) AS f
        INNER JOIN (
            SELECT * FROM inferences FINAL
            WHERE event_id IN (SELECT target_id FROM feedback WHERE {where}){inf_filter}
        ) AS i ON i.event_id = f.target_id AND i.tenant = f.tenant
        ORDER BY f.ts, f.event_id"""
    table = await store.query(sql, params)
    feedback = from_arrow(FeedbackEvent, table, "f__")
    inferences = from_arrow(InferenceEvent, table, "i__")
    return [RatedInference(f, i) for f, i in zip(feedback, inferences, strict=True)]  # type: ignore[arg-type]


class VersionStats(msgspec.Struct, frozen=True, kw_only=True):
    """Per model version over a window: traffic, errors, latency, tokens, and what users said.

    Thumbs and ratings count each inference once, by its latest feedback of that kind.
    `thumbs_up_rate`/`mean_rating` are None without feedback.
    """

    model: str
    model_version: str
    requests: int
    errors: int
    blocked: int
    mean_latency_ms: float
    p95_latency_ms: float
    mean_ttft_ms: float
    tokens_in: int
    tokens_out: int
    thumbs_up: int
    thumbs_down: int
    thumbs_up_rate: float | None
    ratings: int
    mean_rating: float | None


async def version_stats(store: Store, *, start_ms: int, end_ms: int, tenant: str | None = None,
                        model: str | None = None) -> list[VersionStats]:
    """`VersionStats` for every (model, model_version) with inferences in the window, sorted by both."""
    where, params = _where(start_ms, end_ms, tenant=tenant, model=model)
    fb_tenant = " AND tenant = {tenant:String}" if tenant is not None else ""
    sql = f"""
        WITH
        w AS (
            SELECT event_id, tenant, model, model_version, status, latency_ms, ttft_ms, tokens_in, tokens_out
            FROM inferences FINAL WHERE {where} AND NOT shadow
        ),
        fb AS (
            SELECT tenant, target_id,
                   countIf(kind = 'thumbs' AND thumbs IS NOT NULL) > 0 AS has_thumbs,
                   argMaxIf(assumeNotNull(thumbs), ts, kind = 'thumbs' AND thumbs IS NOT NULL) AS up,
                   countIf(kind = 'rating' AND rating IS NOT NULL) > 0 AS has_rating,
                   argMaxIf(assumeNotNull(rating), ts, kind = 'rating' AND rating IS NOT NULL) AS last_rating
            FROM feedback FINAL
            WHERE target_id IN (SELECT event_id FROM w){fb_tenant}
            GROUP BY tenant, target_id
        )
        SELECT w.model AS model, w.model_version AS model_version,
               count() AS requests,
               countIf(w.status = 'error') AS errors,
               countIf(w.status = 'blocked') AS blocked,
               avg(w.latency_ms) AS mean_latency_ms,
               quantileExact(0.95)(w.latency_ms) AS p95_latency_ms,
               avg(w.ttft_ms) AS mean_ttft_ms,
               sum(w.tokens_in) AS tokens_in,
               sum(w.tokens_out) AS tokens_out,
               countIf(fb.has_thumbs AND fb.up) AS thumbs_up,
               countIf(fb.has_thumbs AND NOT fb.up) AS thumbs_down,
               if(thumbs_up + thumbs_down = 0, NULL, thumbs_up / (thumbs_up + thumbs_down)) AS thumbs_up_rate,
               countIf(fb.has_rating) AS ratings,
               if(ratings = 0, NULL, sumIf(fb.last_rating, fb.has_rating) / ratings) AS mean_rating
        FROM w LEFT JOIN fb ON fb.target_id = w.event_id AND fb.tenant = w.tenant
        GROUP BY model, model_version
        ORDER BY model, model_version"""
    rows = (await store.query(sql, params)).to_pylist()
    return [msgspec.convert(r, VersionStats) for r in rows]


async def dead_letters(store: Store, *, limit: int = 100) -> list[DeadLetter]:
    """The most recent dead letters, newest first."""
    table = await store.query("SELECT * FROM dead_letters FINAL ORDER BY ts DESC, event_id LIMIT {limit:UInt64}",
                              {"limit": limit})
    return from_arrow(DeadLetter, table)  # type: ignore[return-value]


async def latest(store: Store, table: str, *, limit: int = 20,
                 tenant: str | None = None) -> list[Mapping[str, object]]:
    """The newest `limit` rows of any table as plain dicts, newest first (for `servoloop db tail`)."""
    where, params = ("WHERE tenant = {tenant:String}", {"tenant": tenant}) if tenant is not None else ("", {})
    result = await store.query(
        f"SELECT * FROM {identifier(table)} FINAL {where} ORDER BY ts DESC LIMIT {{limit:UInt64}}",
        {**params, "limit": limit})
    return result.to_pylist()
