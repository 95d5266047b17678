"""Model name → engine, with ordered fallbacks when an engine cannot serve."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

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


@dataclass(frozen=True, slots=True)
class Served:
    """Which route actually answered (after fallbacks)."""

    name: str
    kind: str
    version: str
    adapter: str | None


class Router:
    """Resolves model names and streams from the first engine that can serve, in fallback order."""

    def __init__(self, routes: list[ModelRoute], *, on_fallback: Callable[[str, str], None] | None = None):
        self._routes = {r.name: r for r in routes}
        self._on_fallback = on_fallback

    def names(self) -> list[str]:
        return list(self._routes)

    def routes(self) -> list[ModelRoute]:
        return list(self._routes.values())

    def primary(self, model: str) -> ModelRoute:
        """The route for `model`; raises ModelNotFound naming the models that exist."""
        route = self._routes.get(model)
        if route is None:
            raise ModelNotFound(
                f"model {model!r} does not exist; available: {', '.join(sorted(self._routes)) or 'none'}",
                param="model",
            )
        return route

    def chain(self, model: str) -> list[ModelRoute]:
        first = self.primary(model)
        return [first, *(self._routes[n] for n in first.fallbacks if n in self._routes)]

    def _falling_back(self, chain: list[ModelRoute], failed: int, err: EngineUnavailable) -> None:
        """Log and count a move from chain[failed] to the next route, if there is one."""
        if failed + 1 < len(chain):
            a, b = chain[failed].name, chain[failed + 1].name
            log.warning("model %s: engine failed (%s), falling back to %s", a, err, b)
            if self._on_fallback:
                self._on_fallback(a, b)

    async def stream(
        self, request: InferenceRequest, served: list[Served]
    ) -> AsyncIterator[Chunk]:
        """Stream from the first route that works; fall back only before any text was sent.

        Appends the route that answered to `served`. Raises the last EngineUnavailable when every
        route failed, and re-raises a failure after the first chunk (a stream cannot switch engines).
        """
        chain = self.chain(request.model)
        last_error: EngineUnavailable | None = None
        for i, route in enumerate(chain):
            started = False
            try:
                async for chunk in route.engine.stream(request, adapter=route.adapter):
                    if not started:
                        started = True
                        served.append(Served(route.name, route.engine.kind, route.version, route.adapter))
                    yield chunk
                return
            except EngineUnavailable as e:
                if started:
                    raise
                last_error = e
                self._falling_back(chain, i, e)
        assert last_error is not None
        raise last_error

    async def generate(self, request: InferenceRequest, served: list[Served]) -> Chunk:
        """Unary generation with the same fallback order."""
        chain = self.chain(request.model)
        last_error: EngineUnavailable | None = None
        for i, route in enumerate(chain):
            try:
                chunk = await route.engine.generate(request, adapter=route.adapter)
            except EngineUnavailable as e:
                last_error = e
                self._falling_back(chain, i, e)
                continue
            served.append(Served(route.name, route.engine.kind, route.version, route.adapter))
            return chunk
        assert last_error is not None
        raise last_error
