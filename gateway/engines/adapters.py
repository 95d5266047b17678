"""Many LoRA adapters in one engine: registered adapters, a bounded set of loaded ones, least recently used out.

An engine registers every adapter it may serve (`register(name, path)`: cheap, no weights read) and keeps at
most `capacity` of them loaded. A request takes its adapter with `async with cache.use(name)`: a loaded one is a
hit; an evicted or never-loaded one is a miss and is loaded on first use, once however many requests wait for
it (single flight), while requests for other adapters carry on. Beyond `capacity` the least recently used
adapter that no request holds is evicted; an adapter in use is never evicted (the bound may be exceeded while
every loaded adapter is in use). Counters (hits, misses, loads, evictions, load time) feed the gateway's
Prometheus metrics (`gateway.metrics.AdapterCacheCollector`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from schemas.errors import NotFound

Load = Callable[[str, str], Awaitable[None]]
Evict = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AdapterCacheStats:
    """A snapshot of one engine's adapter cache, for metrics and /readyz."""

    registered: int
    loaded: int
    capacity: int
    hits: int
    misses: int
    loads: int
    evictions: int
    load_seconds: float


class AdapterCache:
    """Registered adapters and the loaded subset (LRU, bounded by `capacity`); see the module docstring.

    `load(name, path)` makes the adapter usable in the engine, `evict(name)` frees it; both are the engine's.
    """

    def __init__(self, capacity: int, load: Load, evict: Evict) -> None:
        if capacity < 1:
            raise ValueError("an adapter cache holds at least one adapter")
        self.capacity = capacity
        self._load = load
        self._evict = evict
        self._paths: dict[str, str] = {}
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name -> path loaded, least recently used first
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._pins: Counter[str] = Counter()
        self._lock = asyncio.Lock()  # evictions and the loaded set change one at a time
        self.hits = self.misses = self.loads = self.evictions = 0
        self.load_seconds = 0.0

    def registered(self, name: str) -> bool:
        return name in self._paths

    def registered_paths(self) -> dict[str, str]:
        """Every registered adapter, name -> path."""
        return dict(self._paths)

    def path(self, name: str) -> str | None:
        return self._paths.get(name)

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    def stats(self) -> AdapterCacheStats:
        return AdapterCacheStats(len(self._paths), len(self._loaded), self.capacity, self.hits, self.misses,
                                 self.loads, self.evictions, round(self.load_seconds, 6))

    def register(self, name: str, path: str) -> bool:
        """Make `name` servable from `path`; True when that changed anything (new name, or a new path)."""
        if self._paths.get(name) == path:
            return False
        self._paths[name] = path
        return True

    async def unregister(self, name: str) -> None:
        """Forget `name` (evicting it if loaded); raises NotFound for a name never registered."""
        if self._paths.pop(name, None) is None:
            raise NotFound(f"adapter {name!r} is not loaded")
        async with self._lock:
            if self._loaded.pop(name, None) is not None:
                self.evictions += 1
                await self._evict(name)

    async def ensure(self, name: str) -> None:
        """Load `name` now unless it is loaded with its registered path (then it only becomes most recent)."""
        path = self._paths.get(name)
        if path is None:
            raise NotFound(f"adapter {name!r} is not loaded", param="model")
        if self._loaded.get(name) == path:
            self._loaded.move_to_end(name)
            return
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[name] = pending
            try:
                await self._load_one(name, path)
                pending.set_result(None)
            except BaseException as e:
                pending.set_exception(e)
                pending.exception()  # retrieved: no "never retrieved" warning when nobody else waited
                raise
            finally:
                self._loading.pop(name, None)
        else:
            await asyncio.shield(pending)

    async def _load_one(self, name: str, path: str) -> None:
        t0 = time.perf_counter()
        await self._load(name, path)
        self.load_seconds += time.perf_counter() - t0
        self.loads += 1
        async with self._lock:
            self._loaded[name] = path
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.capacity:
                victim = next((n for n in self._loaded if n != name and not self._pins[n]), None)
                if victim is None:  # every other loaded adapter is in use: over the bound until one is free
                    break
                del self._loaded[victim]
                self.evictions += 1
                await self._evict(victim)

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[None]:
        """Hold `name` loaded for one request (loading it on a miss); counts a hit or a miss."""
        self._pins[name] += 1
        try:
            if self._loaded.get(name) == self._paths.get(name) and name in self._loaded:
                self.hits += 1
                self._loaded.move_to_end(name)
            else:
                self.misses += 1
                await self.ensure(name)
            yield
        finally:
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]
