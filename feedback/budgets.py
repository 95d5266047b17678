"""Budgets and spend in the store: what gateways poll (`StoreBudgetSource`) and what operators read.

Budgets are append-only `BudgetEvent` rows (the latest per scope, subject and period is in force);
spend is the sum of `cost_usd` over the inferences of a UTC day or month; alerts are `BudgetAlert`
rows. Every read is exact (FINAL collapses redelivered events).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feedback.store import Store
from feedback.store.base import in_ids
from feedback.store.columns import from_arrow, select_list
from schemas.events import BudgetAlert, BudgetEvent, BudgetPeriod, period_bounds

_SINCE = "ts >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"


def period_start(period: BudgetPeriod, now_s: float) -> int:
    """Epoch ms of the start of the UTC day or month holding `now_s`."""
    return period_bounds(period, now_s)[0]


@dataclass(frozen=True, slots=True)
class Spend:
    """Spend of one (tenant, key) since the start of the current day and month."""

    tenant: str
    key_id: str
    day_usd: float
    month_usd: float


async def budget_rows(store: Store) -> list[BudgetEvent]:
    """Every budget row, oldest first (fold with `gateway.budgets.current_budgets` for what is in force)."""
    table = await store.query(f"SELECT {select_list(BudgetEvent)} FROM budgets FINAL ORDER BY ts, event_id")
    return from_arrow(BudgetEvent, table)  # type: ignore[return-value]


async def budgets_in_force(store: Store, *, tenant: str | None = None) -> list[BudgetEvent]:
    """The latest row per (scope, subject, period) that still sets a limit; with `tenant`, that tenant's only
    (its tenant budget and its keys' budgets)."""
    where = " WHERE tenant = {tenant:String} OR (scope = 'tenant' AND subject = {tenant:String})" if tenant else ""
    table = await store.query(
        f"SELECT * FROM (SELECT {select_list(BudgetEvent)} FROM budgets FINAL{where} "
        "ORDER BY ts DESC, event_id DESC LIMIT 1 BY scope, subject, period) "
        "WHERE soft_usd > 0 OR hard_usd > 0 ORDER BY scope, subject, period",
        {"tenant": tenant} if tenant else {})
    return from_arrow(BudgetEvent, table)  # type: ignore[return-value]


async def spend_since(store: Store, day_start_ms: int, month_start_ms: int, *,
                      tenant: str | None = None) -> list[Spend]:
    """Spend per (tenant, key) since `day_start_ms` and since `month_start_ms` (one scan of the month)."""
    since = min(day_start_ms, month_start_ms)
    where = _SINCE + (" AND tenant = {tenant:String}" if tenant is not None else "")
    table = await store.query(
        "SELECT toString(tenant) AS tenant, toString(key_id) AS key_id, "
        "sumIf(cost_usd, ts >= fromUnixTimestamp64Milli({day_ms:Int64}, 'UTC')) AS day_usd, "
        "sumIf(cost_usd, ts >= fromUnixTimestamp64Milli({month_ms:Int64}, 'UTC')) AS month_usd "
        f"FROM inferences FINAL WHERE {where} AND cost_usd > 0 GROUP BY tenant, key_id ORDER BY tenant, key_id",
        {"since_ms": since, "day_ms": day_start_ms, "month_ms": month_start_ms,
         **({"tenant": tenant} if tenant is not None else {})})
    return [Spend(**r) for r in table.to_pylist()]


async def alert_rows(store: Store, since_ms: int, *, tenant: str | None = None) -> list[BudgetAlert]:
    """Budget alerts raised since `since_ms`, newest first, optionally of one tenant."""
    where = _SINCE + (" AND tenant = {tenant:String}" if tenant is not None else "")
    table = await store.query(f"SELECT {select_list(BudgetAlert)} FROM budget_alerts FINAL WHERE {where} "
                              "ORDER BY ts DESC, event_id",
                              {"since_ms": since_ms, **({"tenant": tenant} if tenant is not None else {})})
    return from_arrow(BudgetAlert, table)  # type: ignore[return-value]


async def budget_status(store: Store, now_s: float, *, tenant: str | None = None) -> list[dict[str, Any]]:
    """Each budget in force with the store's spend against it in its current period and when that resets."""
    day, month = period_start("day", now_s), period_start("month", now_s)
    totals = await spend_since(store, day, month, tenant=tenant)
    out = []
    for b in await budgets_in_force(store, tenant=tenant):
        rows = [r for r in totals if (r.tenant if b.scope == "tenant" else r.key_id) == b.subject]
        used = sum(r.day_usd if b.period == "day" else r.month_usd for r in rows)
        start, reset = period_bounds(b.period, now_s)
        out.append({"scope": b.scope, "subject": b.subject, "tenant": b.tenant, "period": b.period,
                    "soft_usd": b.soft_usd, "hard_usd": b.hard_usd, "spend_usd": used, "period_start_ms": start,
                    "reset_ms": reset, "set_ms": b.ts_ms, "actor": b.actor, "reason": b.reason,
                    "state": "hard" if b.hard_usd and used >= b.hard_usd else
                             "soft" if b.soft_usd and used >= b.soft_usd else "ok"})
    return out


class StoreBudgetSource:
    """What a gateway's BudgetKeeper polls: budgets, this period's spend and the alerts already raised."""

    def __init__(self, store: Store):
        self._store = store

    async def budgets(self) -> Sequence[BudgetEvent]:
        return await budget_rows(self._store)

    async def spend(self, day_start_ms: int, month_start_ms: int) -> Sequence[Spend]:
        return await spend_since(self._store, day_start_ms, month_start_ms)

    async def alerts(self, since_ms: int) -> Sequence[str]:
        table = await self._store.query(f"SELECT DISTINCT event_id FROM budget_alerts WHERE {_SINCE}",
                                        {"since_ms": since_ms})
        return table.column("event_id").to_pylist()

    async def stored(self, event_ids: Sequence[str], since_ms: int) -> Sequence[str]:
        table = await self._store.query(f"SELECT DISTINCT event_id FROM inferences WHERE {_SINCE} "
                                        f"AND event_id IN {in_ids('ids')}", {"since_ms": since_ms,
                                                                                 "ids": list(event_ids)})
        return table.column("event_id").to_pylist()
