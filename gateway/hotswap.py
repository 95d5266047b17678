"""Hot swap: every gateway follows the registry's model events and switches versions without a failed request.

`ModelWatcher` keeps every `ModelEvent` it has seen, folds them into each model's routing
(`gateway.canary.routing_from_events`) and reconciles the router with it: a version it does not serve yet is
fetched and verified (`schemas.artifacts.fetch_verified`, in a worker thread), loaded into the model's engine
under its version id, warmed (one short generation, unless the engine warms adapters as it loads them), and
only then switched in with one reference assignment (`Router.swap`). Requests admitted before the switch keep their route; an adapter no arm uses any
more is unloaded once its requests drained (or after `drain_timeout_s`). A version that cannot be loaded (its
bytes do not match the announced hash, the engine refuses it) is logged and counted and never served: the
previous routing keeps serving.

Sources (`gateway/model_events.py`): the `<prefix>models` topic, replayed from its first record on start, or,
without a broker, a `ModelEventSource` (an async callable returning the rows, e.g. from the store) polled every
`poll_interval_s`.

Tenant-scoped versions (`ModelEvent.tenant`) are reconciled the same way into the router's per-tenant table
(`Router.swap_tenant`); their adapters load into the same engine, beside the global ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.canary import ACTIVE, CANARY, Arm, ModelRouting, routing_from_events, tenant_routings_from_events
from gateway.metrics import GatewayMetrics
from gateway.model_events import KafkaModelEvents, ModelEventSource
from gateway.pins import pinned_states
from gateway.request import InferenceRequest, SamplingParams
from gateway.router import Arms, ModelRoute, Router, TenantArms
from gateway.settings import HotSwapSettings
from schemas.artifacts import ArtifactMismatch, fetch_verified
from schemas.events import ModelEvent

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _Loaded:
    path: str
    sha256: str


class ModelWatcher:
    """Keeps the router's routing equal to what the model events say, loading and unloading adapters."""

    def __init__(self, router: Router, metrics: GatewayMetrics, settings: HotSwapSettings, *, cache_dir: Path,
                 bootstrap_servers: str | None = None, topic: str | None = None,
                 poll: ModelEventSource | None = None):
        if not (bootstrap_servers and topic) and poll is None:
            raise ValueError("ModelWatcher needs a broker (bootstrap_servers and topic) or a poll source")
        self._router = router
        self._metrics = metrics
        self._settings = settings
        self._cache_dir = cache_dir
        self._bootstrap, self._topic = bootstrap_servers, topic
        self._poll = poll
        self._rows: dict[str, ModelEvent] = {}
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()  # the history was replayed and applied once
        self._caught_up = False
        self._pending_since: float | None = None
        self._lock = asyncio.Lock()  # reconciling and unloading never interleave
        self._loaded: dict[tuple[str, str], _Loaded] = {}  # (model, version) -> adapter loaded in its engine
        # (model, version, sha) -> when to try it again (never, for bytes that do not match their hash)
        self._failed: dict[tuple[str, str, str], float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._drains: set[asyncio.Task[None]] = set()
        self._kafka: KafkaModelEvents | None = None
        self.state = "starting"
        self.swaps = 0
        self.failures = 0
        self.last_error = ""
        self.last_swap_s: float | None = None

    # -- sources ------------------------------------------------------------------------------------------

    def add_events(self, events: Iterable[ModelEvent], *, caught_up: bool = True) -> None:
        """Take new rows (from any source, on the event loop); the routing follows asynchronously."""
        new = False
        for e in events:
            if e.event_id not in self._rows:
                self._rows[e.event_id] = e
                new = True
        if new and self._pending_since is None:
            self._pending_since = time.monotonic()
        if new or (caught_up and not self._caught_up):
            self._caught_up = self._caught_up or caught_up
            self._changed.set()

    async def _poll_store(self) -> None:
        assert self._poll is not None
        while True:
            try:
                rows = await self._poll()
                self.add_events(rows)
                if self._kafka is None:
                    self.state = "running"
            except Exception as e:  # the store is away: keep the routing we have
                self._note_error(f"polling model events failed: {type(e).__name__}: {e}")
            await asyncio.sleep(self._settings.poll_interval_s)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following the events; wait (up to `startup_wait_s`) until the current versions are served."""
        loop = asyncio.get_running_loop()
        for model in self._router.names():
            self._publish_versions(model, None, self._router.arms(model))
        self._tasks.append(asyncio.create_task(self._run(), name="model-watcher"))
        if self._bootstrap and self._topic:
            def deliver(events: list[ModelEvent], caught_up: bool) -> None:
                loop.call_soon_threadsafe(lambda: self.add_events(events, caught_up=caught_up))

            self._kafka = KafkaModelEvents(self._bootstrap, self._topic, deliver)
            self._kafka.start()
        if self._poll is not None:
            self._tasks.append(asyncio.create_task(self._poll_store(), name="model-events-poll"))
        try:
            await asyncio.wait_for(self._synced.wait(), self._settings.startup_wait_s)
        except TimeoutError:
            if self._settings.startup_wait_s:
                log.warning("hot swap: the current model versions were not replayed within %.0f s; serving what is "
                            "loaded, versions swap in as they arrive", self._settings.startup_wait_s)
            self._caught_up = True  # apply what arrived so far, and everything after it, as it comes
            self._changed.set()

    async def aclose(self) -> None:
        if self._kafka is not None:
            await asyncio.to_thread(self._kafka.stop)
        for task in [*self._tasks, *self._drains]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._drains, return_exceptions=True)
        self.state = "stopped"

    async def wait_synced(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def status(self) -> dict[str, Any]:
        """For /readyz: the watcher's state, its source, and what each model serves now."""
        models: dict[str, Any] = {}
        for name in self._router.names():
            arms = self._router.arms(name)
            models[name] = {"active": arms.active.version,
                            **({"canary": arms.canary.version, "canary_share": arms.canary_share}
                               if arms.canary is not None else {})}
        out: dict[str, Any] = {"state": self.state, "source": "kafka" if self._kafka is not None else "store",
                               "synced": self._synced.is_set(), "events": len(self._rows), "swaps": self.swaps,
                               "failures": self.failures, "models": models}
        if self._kafka is not None:
            out["topic"] = self._topic
            out["assigned"] = self._kafka.assigned
            if self._kafka.error:
                out["broker_error"] = self._kafka.error
        if self.last_error:
            out["last_error"] = self.last_error
        if self.last_swap_s is not None:
            out["last_swap_s"] = round(self.last_swap_s, 4)
        return out

    def _note_error(self, message: str) -> None:
        self.last_error = message
        log.error("hot swap: %s", message)

    # -- reconciling --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), self._settings.retry_interval_s)
            except TimeoutError:  # nothing new: retry versions that failed for a reason that may pass
                now = time.monotonic()
                if not any(at <= now for at in self._failed.values()):
                    continue
            self._changed.clear()
            if not self._caught_up:  # mid-replay: switch once, to where the history ends
                continue
            started = self._pending_since
            self._pending_since = None
            try:
                async with self._lock:
                    await self._reconcile(started)
            except Exception as e:  # never let one bad version stop the watcher
                self.failures += 1
                self._note_error(f"reconcile failed: {type(e).__name__}: {e}")
            if self.state == "starting":
                self.state = "running"
            self._synced.set()

    async def _reconcile(self, started: float | None) -> None:
        desired = routing_from_events(self._rows.values())
        self._router.versions = pinned_states(self._rows.values())  # for requests pinned to a version
        for model in self._router.names():
            want = desired.get(model, ModelRouting())
            cur = self._router.arms(model)
            active = await self._route(model, want.active, ACTIVE, cur)
            if active is None:  # the new active version could not be loaded: the current one keeps serving
                active = cur.active
            canary = await self._route(model, want.canary, CANARY, cur) if want.canary is not None else None
            share = want.canary_share if canary is not None else 0.0
            if _same(active, cur.active) and _same(canary, cur.canary) and share == cur.canary_share:
                continue
            self._router.swap(model, Arms(active, canary, share))
            elapsed = time.monotonic() - started if started is not None else 0.0
            self.swaps += 1
            self.last_swap_s = elapsed
            m = self._metrics
            m.model_swaps.labels(model, "ok").inc()
            m.model_swap_latency.labels(model).observe(elapsed)
            self._publish_versions(model, cur, Arms(active, canary, share))
            log.info("hot swap: model %s now serves %s%s (%.0f ms after the event)", model, active.version,
                     f", canary {canary.version} at {share:.0%}" if canary else "", elapsed * 1000)
            self._release_unused(model)
        await self._reconcile_tenants()

    async def _reconcile_tenants(self) -> None:
        """Each tenant's own routing: load its versions' adapters, swap them in, drop tenants with none left."""
        desired = tenant_routings_from_events(self._rows.values())
        names = set(self._router.names())
        current = {(m, t) for m in names for t in self._router.tenants(m)}
        for model, tenant in sorted({k for k in desired if k[0] in names} | current):
            want = desired.get((model, tenant), ModelRouting())
            cur = self._router.tenant_arms(model, tenant) or TenantArms()
            old = Arms(self._router.base(model), cur.active, cur.canary_share)  # `_route` reuses matching routes
            old_canary = Arms(self._router.base(model), cur.canary, cur.canary_share)
            active = await self._route(model, want.active, ACTIVE, old, lazy=True) if want.active is not None else None
            if active is None and want.active is not None:
                active = cur.active  # could not be loaded: what the tenant had keeps serving
            canary = await self._route(model, want.canary, CANARY, old_canary, lazy=True) \
                if want.canary is not None else None
            share = want.canary_share if canary is not None else 0.0
            if _same(active, cur.active) and _same(canary, cur.canary) and share == cur.canary_share:
                continue
            self._router.swap_tenant(model, tenant, TenantArms(active, canary, share))
            self.swaps += 1
            self._metrics.model_swaps.labels(model, "ok").inc()
            log.info("hot swap: model %s serves tenant %s %s%s", model, tenant,
                     active.version if active else "the global version",
                     f", canary {canary.version} at {share:.0%}" if canary else "")
            self._release_unused(model)

    def _publish_versions(self, model: str, old: Arms | None, new: Arms) -> None:
        gauge = self._metrics.model_version
        for arm, route in ((ACTIVE, old.active), (CANARY, old.canary)) if old is not None else ():
            if route is not None:
                with contextlib.suppress(KeyError):
                    gauge.remove(model, arm, route.version)
        gauge.labels(model, ACTIVE, new.active.version).set(1)
        if new.canary is not None:
            gauge.labels(model, CANARY, new.canary.version).set(new.canary_share)

    async def _route(self, model: str, arm: Arm | None, arm_name: str, cur: Arms, *,
                     lazy: bool = False) -> ModelRoute | None:
        """The route serving `arm` as `arm_name`, loading its adapter first; None when it cannot be served.

        `lazy` (tenants' versions): where the engine can, the verified adapter is only registered and loads on the
        tenant's first request, so many tenants do not all occupy the engine's adapter cache at once."""
        base = self._router.base(model)
        if arm is None:
            return base if arm_name == ACTIVE else None
        for route in (cur.active, cur.canary):
            if route is not None and route.version == arm.version and route.adapter == arm.adapter \
                    and route.arm == arm_name:
                return route
        made = dataclasses.replace(base, version=arm.version, adapter=arm.adapter, arm=arm_name, ready=True)
        if arm.adapter is None:
            return made
        key = (model, arm.version)
        loaded = self._loaded.get(key)
        if loaded is not None and loaded.sha256 == arm.artifact_sha256:
            return made
        failed_key = (model, arm.version, arm.artifact_sha256)
        if self._failed.get(failed_key, 0.0) > time.monotonic():
            return None
        try:
            async with asyncio.timeout(self._settings.load_timeout_s):
                path = await self._load(base, arm, lazy=lazy)
        except Exception as e:
            outcome = "artifact_mismatch" if isinstance(e, ArtifactMismatch) else "failed"
            why = f"{type(e).__name__}: {e}"
            mismatch = isinstance(e, ArtifactMismatch)
            self._failed[failed_key] = math.inf if mismatch else time.monotonic() + self._settings.retry_interval_s
            self.failures += 1
            self._metrics.model_swaps.labels(model, outcome).inc()
            self._note_error(f"model {model} version {arm.version} is not served ({outcome}): {why}")
            return None
        self._failed.pop(failed_key, None)
        self._loaded[key] = _Loaded(path, arm.artifact_sha256)
        return made

    async def _load(self, base: ModelRoute, arm: Arm, *, lazy: bool = False) -> str:
        """Fetch and verify the artifact, load it into the engine under the version id, warm it (`lazy`: only
        register it, where the engine can, to load on first use)."""
        assert arm.adapter is not None
        t0 = time.monotonic()
        path = await asyncio.to_thread(fetch_verified, arm.adapter_path, arm.artifact_sha256, self._cache_dir)
        t1 = time.monotonic()
        engine = base.engine
        register = getattr(engine, "register_adapter", None)
        if lazy and register is not None:
            await register(arm.adapter, str(path))
            log.info("hot swap: %s/%s registered (fetched and verified in %.0f ms); it loads on first use",
                     base.name, arm.version, (t1 - t0) * 1000)
            return str(path)
        await engine.load_adapter(arm.adapter, str(path))
        t2 = time.monotonic()
        warm = InferenceRequest(model=base.name, operation="text_completion", prompt="Hello",
                                params=SamplingParams(max_tokens=1, temperature=0.0),
                                request_id=f"warm-{uuid.uuid4().hex}")
        try:
            if not getattr(engine, "warms_adapters_on_load", False):
                await engine.generate(warm, adapter=arm.adapter)
        except BaseException:
            with contextlib.suppress(Exception):
                await engine.unload_adapter(arm.adapter)
            raise
        log.info("hot swap: %s/%s ready: fetched and verified in %.0f ms, loaded in %.0f ms, warmed in %.0f ms",
                 base.name, arm.version, (t1 - t0) * 1000, (t2 - t1) * 1000, (time.monotonic() - t2) * 1000)
        return str(path)

    # -- draining -----------------------------------------------------------------------------------------

    def _in_use(self, model: str, version: str) -> bool:
        arms = self._router.arms(model)
        if any(r is not None and r.adapter == version for r in (arms.active, arms.canary)):
            return True
        for tenant in self._router.tenants(model):
            own = self._router.tenant_arms(model, tenant)
            if own is not None and any(r is not None and r.adapter == version for r in (own.active, own.canary)):
                return True
        return False

    def _release_unused(self, model: str) -> None:
        for m, version in list(self._loaded):
            if m == model and not self._in_use(model, version):
                task = asyncio.create_task(self._drain_and_unload(model, version), name=f"drain-{model}-{version}")
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)

    async def _drain_and_unload(self, model: str, version: str) -> None:
        """Unload `version` once no admitted request uses it (or the drain timeout passed)."""
        engine = self._router.base(model).engine
        deadline = time.monotonic() + self._settings.drain_timeout_s
        while self._router.in_flight(engine, version) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 (a counter, polled)
            await asyncio.sleep(0.05)
        async with self._lock:
            if self._in_use(model, version) or (model, version) not in self._loaded:
                return  # switched back to it meanwhile, or already gone
            left = self._router.in_flight(engine, version)
            if left:
                log.warning("hot swap: unloading %s/%s with %d requests still on it (drain timeout)", model,
                            version, left)
            try:
                await engine.unload_adapter(version)
            except Exception as e:
                self._note_error(f"unloading {model}/{version} failed: {type(e).__name__}: {e}")
            self._loaded.pop((model, version), None)
            log.info("hot swap: unloaded adapter %s of model %s", version, model)


def _same(a: ModelRoute | None, b: ModelRoute | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.version, a.adapter, a.arm) == (b.version, b.adapter, b.arm)
