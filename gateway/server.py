"""A gateway process: engines, router, core service, auth; HTTP and gRPC front ends in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health_pb2

from gateway.auth import Authenticator, KeyStore
from gateway.budgets import BudgetKeeper, BudgetSource, PriceTable
from gateway.cache import ResponseCache
from gateway.engines import Engine, vllm_available
from gateway.events import EventEmitter, EventPublisher
from gateway.feedback import FeedbackService, InferenceOwners
from gateway.guarding import RequestGuard
from gateway.hotswap import ModelWatcher
from gateway.langfuse import LangfuseScores, TraceIndex
from gateway.limits import RateLimiter
from gateway.metrics import GatewayMetrics
from gateway.model_events import ModelEventSource
from gateway.router import ModelRoute, Router
from gateway.service import InferenceService
from gateway.settings import GatewaySettings, ModelSettings
from gateway.shadow import ShadowReplayer
from gateway.tracing import RequestTracer
from guardrails import PolicyReloader, default_policy_set
from schemas.events import FeedbackEvent

log = logging.getLogger(__name__)


def make_engine(ms: ModelSettings, *, vllm_in_process: bool = True) -> Engine:
    """The engine a model's settings ask for; `auto` picks vLLM where it is installed, else Transformers."""
    kind = ms.engine
    if kind == "auto":
        kind = "remote" if ms.url and not ms.path else ("vllm" if vllm_available() else "transformers")
    if kind == "remote":
        from gateway.engines.remote import RemoteEngine

        return RemoteEngine(ms)
    if kind == "vllm":
        from gateway.engines.vllm import VLLMEngine

        return VLLMEngine(ms, in_process=vllm_in_process)
    from gateway.engines.transformers import TransformersEngine

    return TransformersEngine(ms)


class Gateway:
    """Everything one serving process holds. Other components extend it through `http_extensions`."""

    def __init__(self, settings: GatewaySettings, keys: KeyStore, *, engines: dict[str, Engine] | None = None,
                 metrics: GatewayMetrics | None = None, events: EventPublisher | None = None,
                 prices: PriceTable | None = None):
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.limiter = RateLimiter(settings.rate_limits)
        self.auth = Authenticator(keys, self.limiter, reload_interval_s=settings.auth.reload_interval_s)
        self._owns_engines = engines is None  # engines handed in are started and closed by their owner
        engines = engines if engines is not None else {m.name: make_engine(m) for m in settings.models}
        self.engines = engines
        self.metrics.watch_adapters(engines)  # adapters loaded, cache hits/misses, load time per engine
        routes = [ModelRoute(m.name, engines[m.name], tuple(m.fallbacks)) for m in settings.models]
        self.router = Router(routes, on_fallback=lambda a, b: self.metrics.fallbacks.labels(a, b).inc())
        cache = ResponseCache(settings.cache.max_entries, settings.cache.ttl_s) if settings.cache.enabled else None
        g = settings.guardrails
        self.policies: PolicyReloader | None = None
        guard = None
        if g.enabled:
            if g.policy_path is not None:
                self.policies = PolicyReloader(g.policy_path, interval_s=g.reload_interval_s)
                reloader = self.policies
                guard = RequestGuard(lambda: reloader.current, plant_canary=g.plant_canary)
            else:
                bundled = default_policy_set()
                guard = RequestGuard(lambda: bundled, plant_canary=g.plant_canary)
        t = settings.tracing
        self.service = InferenceService(self.router, self.limiter, self.metrics, settings.limits, cache=cache,
                                        guard=guard, trace_sample_ratio=t.sample_ratio if t.enabled else None,
                                        prices=prices)
        self.events = events  # the event sink's publisher (None: no event pipeline, metrics only)
        if events is not None:
            emitter = EventEmitter(events)
            self.service.add_observer(emitter, refused=emitter.refused)
        # Called with each accepted FeedbackEvent after it was published (e.g. Langfuse scores); never raises.
        self.feedback_observers: list[Callable[[FeedbackEvent], None]] = []
        # Tracing (off by default: then only trace ids are assigned): spans per request, Langfuse scores.
        self.tracing: RequestTracer | None = None
        self.scores: LangfuseScores | None = None
        if t.enabled:
            self.tracing = RequestTracer.from_settings(t)
            self.service.add_observer(self.tracing, refused=self.tracing.refused)
            if t.langfuse.host and t.langfuse.scores:
                index = TraceIndex(t.langfuse.trace_index_size)
                self.service.add_observer(index)
                self.scores = LangfuseScores(t.langfuse, index, registry=self.metrics.registry)
                self.feedback_observers.append(self.scores)
        # The Feedback API: which tenant owns which inference (set `inference_owners.lookup` to consult the
        # store beyond this gateway's recent inferences), and the core both front ends call.
        self.inference_owners = InferenceOwners(settings.feedback)
        self.service.add_observer(self.inference_owners.observe)
        # Shadow routing: sampled finished requests replayed to a candidate arm, recorded, never returned.
        self.shadow: ShadowReplayer | None = None
        if settings.shadow and events is not None:
            self.shadow = ShadowReplayer(settings.shadow, self.router, events.publish, registry=self.metrics.registry)
            self.service.add_observer(self.shadow)
        elif settings.shadow:
            log.warning("gateway.shadow is set but this gateway has no event pipeline to record shadow answers: off")
        self.feedback = FeedbackService(settings.feedback, self.inference_owners, self.limiter,
                                        publisher=lambda: self.events, observers=self.feedback_observers,
                                        count=lambda tenant, outcome: self.metrics.feedback.labels(tenant, outcome).inc())
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = int(time.time())
        self.http_extensions: list[Callable[[FastAPI], None]] = []
        # Companion components' state for /readyz (e.g. the event pipeline); informational, not a readiness gate.
        self.status_providers: dict[str, Callable[[], dict[str, Any]]] = {}
        self.model_watcher: ModelWatcher | None = None  # set by follow_models: versions follow the registry
        self.budgets: BudgetKeeper | None = None  # set by follow_budgets: spend budgets read from the store
        self._ready = False

    def follow_models(self, *, cache_dir: Path, bootstrap_servers: str | None = None, topic: str | None = None,
                      poll: ModelEventSource | None = None) -> ModelWatcher:
        """Hot-swap model versions as the model events say (Kafka topic, or a polled source); started by `start`."""
        self.model_watcher = ModelWatcher(self.router, self.metrics, self.settings.hotswap, cache_dir=cache_dir,
                                          bootstrap_servers=bootstrap_servers, topic=topic, poll=poll)
        self.status_providers["hotswap"] = self.model_watcher.status
        return self.model_watcher

    def follow_budgets(self, source: BudgetSource) -> BudgetKeeper:
        """Enforce the spend budgets `source` holds (seeded at start, then polled); alerts go to the event sink."""
        self.budgets = BudgetKeeper(source, self.settings.budgets,
                                    publish=self.events.publish if self.events is not None else None)
        self.service.budgets = self.budgets
        self.service.add_observer(self.budgets.observe)
        self.status_providers["budgets"] = self.budgets.status
        return self.budgets

    def extend_http(self, app: FastAPI) -> None:
        for extend in self.http_extensions:
            extend(app)

    async def start(self) -> None:
        """Start every engine (concurrently) and the key reloader; the gateway is ready afterwards."""
        if self._owns_engines:
            await asyncio.gather(*(e.start() for e in self.engines.values()))
        for r in self.router.routes():
            r.ready = True
        if self.model_watcher is not None:  # replays the model events: serve the current versions from the start
            await self.model_watcher.start()
        await self.auth.start()
        if self.budgets is not None:  # spend so far this period, from the store: budgets hold across restarts
            await self.budgets.start()
        if self.policies is not None:
            self._tasks.append(asyncio.create_task(self.policies.run(), name="guardrail-policy-reloader"))
        if self.scores is not None:
            await self.scores.start()
        if self.shadow is not None:
            await self.shadow.start()
        self._ready = True

    async def aclose(self) -> None:
        self._ready = False
        if self.model_watcher is not None:
            await self.model_watcher.aclose()
        if self.budgets is not None:
            await self.budgets.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.auth.aclose()
        if self.scores is not None:
            await self.scores.aclose()
        if self.tracing is not None:  # exports what is queued; the SDK's shutdown blocks, so off the loop
            await asyncio.to_thread(self.tracing.shutdown)
        if self.shadow is not None:  # queued replays finish (briefly) before the engines close
            await self.shadow.aclose()
        if self._owns_engines:
            await asyncio.gather(*(e.aclose() for e in self.engines.values()), return_exceptions=True)

    def readiness(self) -> dict[str, Any]:
        models = {r.name: r.ready for r in self.router.routes()}
        report: dict[str, Any] = {"ready": self._ready and all(models.values()), "models": models}
        for name, provide in self.status_providers.items():
            try:
                report[name] = provide()
            except Exception as e:  # a component's status must never break the probe
                report[name] = {"error": f"{type(e).__name__}: {e}"}
        return report


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class GatewayServer:
    """Runs a Gateway's HTTP (uvicorn) and gRPC front ends; drains both on stop."""

    def __init__(self, gw: Gateway, *, host: str | None = None, http_port: int | None = None,
                 grpc_port: int | None = None):
        self.gw = gw
        s = gw.settings
        self.host = host or s.host
        self._http_sock = _bind(self.host, s.http_port if http_port is None else http_port)
        self.http_port: int = self._http_sock.getsockname()[1]
        self._grpc_port_wanted = s.grpc_port if grpc_port is None else grpc_port
        self.grpc_port = 0
        self._uvicorn: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._grpc: Any = None
        self._health: Any = None

    async def start(self) -> None:
        from gateway.grpc.server import FEEDBACK, INFERENCE, MODELS, create_grpc_server
        from gateway.http.app import create_http_app

        self._grpc, self.grpc_port, self._health = await create_grpc_server(
            self.gw, f"{self.host}:{self._grpc_port_wanted}")
        await self._grpc.start()
        await self.gw.start()
        app = create_http_app(self.gw)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", proxy_headers=False,
                                server_header=False, date_header=False, backlog=2048,
                                timeout_graceful_shutdown=int(self.gw.settings.drain_timeout_s) or None)
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._http_task = asyncio.create_task(self._uvicorn.serve(sockets=[self._http_sock]), name="http")
        while not self._uvicorn.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)
        for name in (INFERENCE, MODELS, FEEDBACK, ""):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's full
        # collections, which otherwise walk the whole heap and stall the event loop for milliseconds.
        gc.collect()
        gc.freeze()
        sys.setswitchinterval(self.gw.settings.switch_interval_ms / 1000)
        log.info("gateway serving: HTTP %s:%d, gRPC %s:%d", self.host, self.http_port, self.host, self.grpc_port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout_s), then close engines."""
        grace = self.gw.settings.drain_timeout_s
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, grace + 1)
        await self.gw.aclose()
        self._http_sock.close()
