"""Model name → engine, with ordered fallbacks when an engine cannot serve; per model an active and a canary arm.

Each model's arms live in one table that the hot-swap watcher replaces with a single reference assignment:
a request picks its route once, at admission (`select`), and keeps that route object (version and adapter)
until it ends, whatever swaps happen meanwhile. `hold`/`release` count requests per engine adapter, so an
old adapter is unloaded only after the requests that use it drained.

Tenants with versions of their own have a second table, (model, tenant) -> `TenantArms`, swapped the same way:
`select(model, key, tenant)` takes the tenant's canary or active route and falls back to the model's global
active route for what the tenant lacks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.canary import ACTIVE, CANARY, choose_arm
from gateway.engines import Engine
from gateway.request import Chunk, InferenceRequest
from schemas.errors import EngineUnavailable, ModelNotFound

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelRoute:
    name: str
    engine: Engine
    fallbacks: tuple[str, ...] = ()
    version: str = "base"
    adapter: str | None = None
    ready: bool = field(default=False)
    arm: str = ACTIVE  # active | canary: which arm of the model's split this route is


@dataclass(frozen=True, slots=True)
class Arms:
    """What one model serves now: the active route and an optional canary route with its traffic share."""

    active: ModelRoute
    canary: ModelRoute | None = None
    canary_share: float = 0.0


@dataclass(frozen=True, slots=True)
class TenantArms:
    """What one tenant of a model serves: its own active route (None: the global one) and an optional canary."""

    active: ModelRoute | None = None
    canary: ModelRoute | None = None
    canary_share: float = 0.0


@dataclass(frozen=True, slots=True)
class Served:
    """Which route actually answered (after fallbacks)."""

    name: str
    kind: str
    version: str
    adapter: str | None
    arm: str = ACTIVE


class Router:
    """Resolves model names and streams from the first engine that can serve, in fallback order."""

    def __init__(self, routes: list[ModelRoute], *, on_fallback: Callable[[str, str], None] | None = None):
        self._base = {r.name: r for r in routes}  # as configured: the base model of each name
        self._table: dict[str, Arms] = {r.name: Arms(r) for r in routes}
        self._tenant_table: dict[tuple[str, str], TenantArms] = {}
        self._on_fallback = on_fallback
        self._in_flight: Counter[tuple[int, str | None]] = Counter()
        # (model, version) -> state and successor, for requests pinned to a version (set by the hot-swap watcher)
        self.versions: dict[tuple[str, str], Any] = {}

    def names(self) -> list[str]:
        return list(self._base)

    def routes(self) -> list[ModelRoute]:
        """Each model's active route."""
        return [a.active for a in self._table.values()]

    def base(self, model: str) -> ModelRoute:
        """The configured route of `model` (its base model, no adapter)."""
        return self._base[model]

    def arms(self, model: str) -> Arms:
        return self._table[model]

    def swap(self, model: str, arms: Arms) -> None:
        """Route new requests of `model` to `arms` from now on; requests already admitted keep their route."""
        table = dict(self._table)
        table[model] = arms
        self._table = table  # one reference assignment: a reader sees the old table or the new one

    def tenant_arms(self, model: str, tenant: str) -> TenantArms | None:
        """The tenant's own routing of `model`, or None when it is served the global one."""
        return self._tenant_table.get((model, tenant))

    def tenants(self, model: str) -> list[str]:
        """The tenants with a routing of their own for `model`."""
        return sorted(t for (m, t) in self._tenant_table if m == model)

    def swap_tenant(self, model: str, tenant: str, arms: TenantArms | None) -> None:
        """Route the tenant's new requests of `model` to `arms` (None: back to the global routing)."""
        table = dict(self._tenant_table)
        if arms is None or (arms.active is None and arms.canary is None):
            table.pop((model, tenant), None)
        else:
            table[(model, tenant)] = arms
        self._tenant_table = table  # one reference assignment, as in `swap`

    def _arms(self, model: str) -> Arms:
        arms = self._table.get(model)
        if arms is None:
            raise ModelNotFound(
                f"model {model!r} does not exist; available: {', '.join(sorted(self._base)) or 'none'}",
                param="model",
            )
        return arms

    def primary(self, model: str) -> ModelRoute:
        """The active route for `model`; raises ModelNotFound naming the models that exist."""
        return self._arms(model).active

    def select(self, model: str, sticky_key: str, tenant: str = "") -> ModelRoute:
        """The route a request of `model` takes: the canary for the keys its share sticks to, else the active.

        A `tenant` with a routing of its own gets its canary or active route; what it lacks comes from the
        model's global routing (a tenant's own canary replaces the global one for that tenant).
        """
        arms = self._arms(model)
        own = self._tenant_table.get((model, tenant)) if tenant else None
        if own is not None:
            if own.canary is not None and choose_arm(model, sticky_key, own.canary_share) == CANARY:
                return own.canary
            if own.active is not None:
                return own.active
            return arms.active
        if arms.canary is not None and choose_arm(model, sticky_key, arms.canary_share) == CANARY:
            return arms.canary
        return arms.active

    def pinned(self, model: str, version: str, tenant: str = "") -> ModelRoute:
        """The route serving `version` of `model` to `tenant` (its own or the global active/canary route); raises
        `version_retired` naming the successor for a version that stopped serving (gateway/pins.py)."""
        from gateway.pins import not_served_error

        arms = self._arms(model)
        own = self._tenant_table.get((model, tenant)) if tenant else None
        for route in (own.active if own else None, own.canary if own else None, arms.active, arms.canary):
            if route is not None and route.version == version:
                return route
        raise not_served_error(model, version, self.versions.get((model, version)))

    def chain(self, model: str, first: ModelRoute | None = None) -> list[ModelRoute]:
        """`first` (default: the active route of `model`), then the active routes of its fallbacks."""
        first = first or self.primary(model)
        table = self._table
        return [first, *(table[n].active for n in first.fallbacks if n in table)]

    def hold(self, route: ModelRoute) -> None:
        """Count a request that will use `route` until `release`."""
        self._in_flight[(id(route.engine), route.adapter)] += 1

    def release(self, route: ModelRoute) -> None:
        key = (id(route.engine), route.adapter)
        left = self._in_flight[key] - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            del self._in_flight[key]

    def in_flight(self, engine: Engine, adapter: str | None) -> int:
        """Requests admitted and not finished that use `adapter` on `engine`."""
        return self._in_flight.get((id(engine), adapter), 0)

    def _falling_back(self, chain: list[ModelRoute], failed: int, err: EngineUnavailable) -> None:
        """Log and count a move from chain[failed] to the next route, if there is one."""
        if failed + 1 < len(chain):
            a, b = chain[failed].name, chain[failed + 1].name
            log.warning("model %s: engine failed (%s), falling back to %s", a, err, b)
            if self._on_fallback:
                self._on_fallback(a, b)

    async def stream(
        self, request: InferenceRequest, served: list[Served], route: ModelRoute | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream from `route` (default: the active one), then its fallbacks; fall back only before any text.

        Appends the route that answered to `served`. Raises the last EngineUnavailable when every
        route failed, and re-raises a failure after the first chunk (a stream cannot switch engines).
        """
        chain = self.chain(request.model, route)
        last_error: EngineUnavailable | None = None
        for i, route in enumerate(chain):
            started = False
            try:
                async for chunk in route.engine.stream(request, adapter=route.adapter):
                    if not started:
                        started = True
                        served.append(Served(route.name, route.engine.kind, route.version, route.adapter,
                                              route.arm))
                    yield chunk
                return
            except EngineUnavailable as e:
                if started:
                    raise
                last_error = e
                self._falling_back(chain, i, e)
        assert last_error is not None
        raise last_error

    async def generate(self, request: InferenceRequest, served: list[Served],
                       route: ModelRoute | None = None) -> Chunk:
        """Unary generation with the same fallback order."""
        chain = self.chain(request.model, route)
        last_error: EngineUnavailable | None = None
        for i, route in enumerate(chain):
            try:
                chunk = await route.engine.generate(request, adapter=route.adapter)
            except EngineUnavailable as e:
                last_error = e
                self._falling_back(chain, i, e)
                continue
            served.append(Served(route.name, route.engine.kind, route.version, route.adapter, route.arm))
            return chunk
        assert last_error is not None
        raise last_error
