"""Budgets and spend in the store: what gateways poll (`StoreBudgetSource`) and what operators read.

Budgets are append-only `BudgetEvent` rows (the latest per scope, subject and period is in force);
spend is the sum of `cost_usd` over the inferences of a UTC day or month; alerts are `BudgetAlert`
rows. Every read is exact (FINAL collapses redelivered events).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from feedback.store import Store
from feedback.store.columns import from_arrow, select_list
from schemas.events import BudgetAlert, BudgetEvent

_SINCE = "ts >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"


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
                                        "AND event_id IN {ids:Array(String)}", {"since_ms": since_ms,
                                                                                 "ids": list(event_ids)})
        return table.column("event_id").to_pylist()
