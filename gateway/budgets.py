"""Spend and budgets: what each request cost (tokens x the price table) and per-tenant or per-key budgets.

Spend is computed on the request path in O(1) (`PriceTable.cost`, two multiplications) and recorded
with each inference event (`cost_usd`). Budgets are append-only `BudgetEvent` rows in the store
(`servoloop budgets set`), per tenant or per key, per UTC day or month, with a soft limit (one
`BudgetAlert` per period) and a hard limit (refused with `budget_exceeded`, HTTP 429 / gRPC
RESOURCE_EXHAUSTED, `Retry-After` = seconds until the period resets).

The request path never waits on the store: a `BudgetKeeper` holds the budgets and spend counters in
memory. It reads the budgets and the period's spend from the store at start (so spend survives a
restart) and every `poll_interval_s` (so it sees other gateways' spend and budget changes), and adds
each finished request's cost as it completes.

Spend estimate per (scope, subject, period) = the store's sum at the last read + this gateway's own
requests not yet seen in the store (each read also asks which of them arrived), so a request is never
missed by its own gateway and never counted twice (for a moment at most, on the safe side). Over-spend bound: a request is checked at admission, before its cost is known, so spend can pass the
hard limit by the requests in flight when it is reached; with N gateways, each also misses the others'
spend not yet visible to its last read (ingest lag + `poll_interval_s`): over-spend <= in-flight cost +
(N - 1) x (spend rate per gateway) x (ingest lag + poll interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from schemas.errors import RateLimited
from schemas.events import BudgetAlert, BudgetEvent, BudgetPeriod, Event, period_bounds

if TYPE_CHECKING:
    from gateway.auth import Principal
    from gateway.service import Outcome
    from gateway.settings import BudgetSettings

log = logging.getLogger(__name__)
PERIODS: tuple[BudgetPeriod, ...] = ("day", "month")
_ALERT_NS = uuid.UUID("0b7e4a35-3a7e-4f8a-9a43-59d1b2a6c8e4")


class PriceTable:
    """Price per 1,000 tokens (input, output) by model; `*` is the fallback. Unlisted models cost 0."""

    def __init__(self, prices: Mapping[str, tuple[float, float]] | None = None):
        self._prices = {m: (p[0] / 1000.0, p[1] / 1000.0) for m, p in (prices or {}).items()}
        self._default = self._prices.get("*")

    @classmethod
    def from_settings(cls, prices: Mapping[str, Any]) -> PriceTable:
        """From the monitors' price table (`monitors.prices`: model -> input_per_1k, output_per_1k)."""
        return cls({m: (p.input_per_1k, p.output_per_1k) for m, p in prices.items()})

    def __bool__(self) -> bool:
        return bool(self._prices)

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """What `tokens_in` prompt and `tokens_out` completion tokens of `model` cost (O(1), no I/O)."""
        price = self._prices.get(model, self._default)
        if price is None:
            return 0.0
        return tokens_in * price[0] + tokens_out * price[1]


__all__ = ["BudgetExceeded", "BudgetKeeper", "BudgetSource", "PriceTable", "current_budgets", "period_bounds"]


def iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


class BudgetExceeded(RateLimited):
    """Spend reached a hard budget; retry after the period resets (`details.reset_at`)."""

    code = "budget_exceeded"

    def __init__(self, budget: BudgetEvent, spend: float, reset_ms: int, now_s: float):
        who = f"tenant {budget.subject!r}" if budget.scope == "tenant" else f"key {budget.subject}"
        reset_at = iso_ms(reset_ms)
        super().__init__(f"the {'daily' if budget.period == 'day' else 'monthly'} budget of {budget.hard_usd:g} for {who} is spent "
                         f"({spend:.6g} used); it resets at {reset_at}",
                         retry_after_s=max(0.0, reset_ms / 1000 - now_s), limit="budget")
        self.details.update({"scope": budget.scope, "period": budget.period, "hard_usd": budget.hard_usd,
                             "spend_usd": round(spend, 9), "reset_at": reset_at})
        self.reset_at = reset_at


class SpendRow(Protocol):
    """The store's spend of one (tenant, key) in the current day and month."""

    @property
    def tenant(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def day_usd(self) -> float: ...
    @property
    def month_usd(self) -> float: ...


class BudgetSource(Protocol):
    """What the keeper reads from the store (feedback/budgets.py implements it over any Store)."""

    async def budgets(self) -> Sequence[BudgetEvent]: ...

    async def spend(self, day_start_ms: int, month_start_ms: int) -> Sequence[SpendRow]: ...

    async def alerts(self, since_ms: int) -> Sequence[str]: ...

    async def stored(self, event_ids: Sequence[str], since_ms: int) -> Sequence[str]:
        """Which of these inference ids the store holds (this gateway's requests that were ingested)."""
        ...


def current_budgets(rows: Sequence[BudgetEvent]) -> dict[tuple[str, str, str], BudgetEvent]:
    """The latest row per (scope, subject, period); cleared budgets (both limits 0) are left out."""
    latest: dict[tuple[str, str, str], BudgetEvent] = {}
    for b in sorted(rows, key=lambda r: (r.ts_ms, r.event_id)):
        latest[(b.scope, b.subject, b.period)] = b
    return {k: b for k, b in latest.items() if b.soft_usd or b.hard_usd}


def alert_id(scope: str, subject: str, period: str, start_ms: int, level: str) -> str:
    """The one event id of an alert: a second gateway's copy of it is deduplicated by the store."""
    return str(uuid.uuid5(_ALERT_NS, f"{scope}\x00{subject}\x00{period}\x00{start_ms}\x00{level}"))


@dataclass(slots=True)
class _Counter:
    start_ms: int
    reset_ms: int
    seen: float = 0.0  # the store's spend at the last read (every gateway's ingested requests)
    pending: float = 0.0  # this gateway's requests not in the store at the last read

    @property
    def estimate(self) -> float:
        return self.seen + self.pending


@dataclass(slots=True)
class _Status:
    refreshes: int = 0
    last_refresh_ms: int = 0
    error: str = ""
    alerts: int = 0
    refused: int = 0


class BudgetKeeper:
    """Budgets and spend counters of one gateway: `check` at admission, `observe` when a request ends."""

    def __init__(self, source: BudgetSource | None, settings: BudgetSettings, *,
                 publish: Callable[[Event], None] | None = None, clock: Callable[[], float] = time.time):
        self._source = source
        self._settings = settings
        self._publish = publish
        self.clock = clock  # wall-clock seconds: periods are UTC days and months
        self._budgets: dict[tuple[str, str], list[BudgetEvent]] = {}
        self._counters: dict[tuple[str, str, str], _Counter] = {}
        self._alerted: set[str] = set()
        # This gateway's priced requests not yet seen in the store: id -> (cost, the counters it was added to)
        self._pending: dict[str, tuple[float, tuple[_Counter, ...]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.state = _Status()

    # -- the request path (synchronous, dict lookups only) -------------------------------------------

    def _counter(self, scope: str, subject: str, period: BudgetPeriod, now_s: float) -> _Counter:
        key = (scope, subject, period)
        c = self._counters.get(key)
        if c is None or now_s * 1000 >= c.reset_ms:  # first sight, or a new period: spend starts from 0
            c = _Counter(*period_bounds(period, now_s))
            self._counters[key] = c
        return c

    def check(self, principal: Principal) -> None:
        """Raise BudgetExceeded if the key's or its tenant's spend reached a hard limit; O(budgets of it)."""
        if not self._budgets:
            return
        now = self.clock()
        for scope, subject in (("key", principal.key_id), ("tenant", principal.tenant)):
            for b in self._budgets.get((scope, subject), ()):
                if b.hard_usd:
                    c = self._counter(scope, subject, b.period, now)
                    if c.estimate >= b.hard_usd:
                        self.state.refused += 1
                        raise BudgetExceeded(b, c.estimate, c.reset_ms, now)

    def observe(self, outcome: Outcome) -> None:
        """Add a finished request's cost to its key's and tenant's counters; raise alerts it crossed."""
        cost = outcome.cost_usd
        if cost <= 0:
            return
        p = outcome.admission.principal
        self.add(outcome.admission.id, p.tenant, p.key_id, cost)

    def add(self, request_id: str, tenant: str, key_id: str, cost: float) -> None:
        """Count one finished request's cost (its inference event id is `request_id`)."""
        now = self.clock()
        counters: list[_Counter] = []
        for scope, subject in (("key", key_id), ("tenant", tenant)):
            for period in PERIODS:
                c = self._counter(scope, subject, period, now)
                c.pending += cost
                counters.append(c)
        if self._source is not None:  # without a store nothing confirms them: the counters are the spend
            if len(self._pending) >= self._settings.max_pending:  # the store is far behind: assume the oldest landed
                old_cost, old = self._pending.pop(next(iter(self._pending)))
                for c in old:
                    c.pending -= old_cost
            self._pending[request_id] = (cost, tuple(counters))
        for scope, subject in (("key", key_id), ("tenant", tenant)):
            for b in self._budgets.get((scope, subject), ()):
                self._maybe_alert(b, tenant, self._counters[(scope, subject, b.period)])

    def _maybe_alert(self, b: BudgetEvent, tenant: str, c: _Counter) -> None:
        spend = c.estimate
        for level, limit in (("soft", b.soft_usd), ("hard", b.hard_usd)):
            if not limit or spend < limit:
                continue
            event_id = alert_id(b.scope, b.subject, b.period, c.start_ms, level)
            if event_id in self._alerted:
                continue
            self._alerted.add(event_id)
            self.state.alerts += 1
            log.warning("budget %s limit reached: %s %s, %s spend %.6g of %g", level, b.scope, b.subject, b.period,
                        spend, limit)
            if self._publish is not None:
                self._publish(BudgetAlert(event_id=event_id, tenant=tenant if b.scope == "key" else b.subject,
                                          scope=b.scope, subject=b.subject, period=b.period, level=level,  # type: ignore[arg-type]
                                          period_start_ms=c.start_ms, reset_ms=c.reset_ms, spend_usd=spend,
                                          limit_usd=limit))

    # -- what is in force (read by the CLI, the admin API and tests) ---------------------------------

    def spend(self, scope: str, subject: str, period: BudgetPeriod) -> float:
        """This gateway's estimate of the subject's spend in the current period."""
        return self._counter(scope, subject, period, self.clock()).estimate

    def budgets(self) -> list[BudgetEvent]:
        return [b for bs in self._budgets.values() for b in bs]

    def status(self) -> dict[str, Any]:
        s = self.state
        return {"budgets": sum(map(len, self._budgets.values())), "refreshes": s.refreshes,
                "last_refresh_ms": s.last_refresh_ms, "alerts": s.alerts, "refused": s.refused,
                **({"error": s.error} if s.error else {})}

    # -- the background side -------------------------------------------------------------------------

    def set_budgets(self, rows: Sequence[BudgetEvent]) -> None:
        """Put the latest budget per (scope, subject, period) in force (replacing all others)."""
        by_subject: dict[tuple[str, str], list[BudgetEvent]] = {}
        for (scope, subject, _), b in current_budgets(rows).items():
            by_subject.setdefault((scope, subject), []).append(b)
        self._budgets = by_subject

    async def refresh(self) -> None:
        """Read the budgets, the period's spend and the raised alerts from the store (off the request path)."""
        if self._source is None:
            return
        now = self.clock()
        day_start, _ = period_bounds("day", now)
        month_start, _ = period_bounds("month", now)
        budgets = await self._source.budgets()
        # Own requests the store holds, asked BEFORE the sums: one ingested in between is counted twice until
        # the next read (too much, never too little).
        ids = list(self._pending)
        landed = await self._source.stored(ids, month_start) if ids else ()
        rows = await self._source.spend(day_start, month_start)
        alerts = await self._source.alerts(month_start)
        for event_id in landed:
            entry = self._pending.pop(event_id, None)
            if entry is not None:
                for c in entry[1]:
                    c.pending -= entry[0]
        now_ms = int(now * 1000)  # requests of periods that ended count nowhere now: forget them
        for event_id in [i for i, (_, cs) in self._pending.items() if all(c.reset_ms <= now_ms for c in cs)]:
            del self._pending[event_id]
        self.set_budgets(budgets)
        self._alerted.update(alerts)
        totals: dict[tuple[str, str, str], float] = {}
        for r in rows:
            for scope, subject in (("key", r.key_id), ("tenant", r.tenant)):
                for period, usd in (("day", r.day_usd), ("month", r.month_usd)):
                    k = (scope, subject, period)
                    totals[k] = totals.get(k, 0.0) + usd
        for k in totals.keys() | self._counters.keys():
            c = self._counter(k[0], k[1], k[2], now)  # type: ignore[arg-type]
            c.seen = totals.get(k, 0.0)
        for (scope, subject), bs in self._budgets.items():  # crossed by other gateways' spend, or a lowered limit
            tenant = subject if scope == "tenant" else ""
            for b in bs:
                self._maybe_alert(b, b.tenant or tenant, self._counter(scope, subject, b.period, now))
        self.state.refreshes += 1
        self.state.last_refresh_ms = int(now * 1000)
        self.state.error = ""

    async def start(self) -> None:
        """Seed from the store (waiting up to `startup_wait_s`), then refresh every `poll_interval_s`."""
        if self._source is None:
            return
        try:
            await asyncio.wait_for(self.refresh(), self._settings.startup_wait_s)
        except Exception as e:  # serve anyway: budgets take effect at the next successful read
            self.state.error = f"{type(e).__name__}: {e}"
            log.warning("budgets: the first read from the store failed (%s); retrying every %.1fs",
                        self.state.error, self._settings.poll_interval_s)
        self._task = asyncio.create_task(self._run(), name="budget-keeper")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.state.error = f"{type(e).__name__}: {e}"
                log.warning("budgets: reading the store failed: %s", self.state.error)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

