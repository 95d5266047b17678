"""Wiring only: run the components of `servoloop up` / `servoloop serve` in one process until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial

from prometheus_client import CollectorRegistry

from feedback.budgets import StoreBudgetSource
from feedback.dashboard import admin_extension
from feedback.dashboard.budgets_api import budgets_extension
from feedback.dashboard.models_api import models_extension
from feedback.dashboard.release_api import release_extension
from feedback.graders.export import GradeExporter
from feedback.graders.worker import GradingWorker
from feedback.monitors.runner import Scheduler, sink_publisher
from feedback.pipeline import EventPipeline
from feedback.store import Store, get_inference
from gateway.auth import KeyStore
from gateway.budgets import PriceTable
from gateway.engines import Engine
from gateway.metrics import GatewayMetrics
from gateway.server import Gateway, GatewayServer
from retrain.registry import StoreRegistry, model_rows
from retrain.requests import RequestWorker
from retrain.worker import RetrainWorker
from schemas.errors import ConfigError
from schemas.events import ModelEvent
from schemas.topics import topic_name
from servoloop.settings import Settings

log = logging.getLogger("servoloop")


async def run_until_signalled(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    await stopping.wait()
    log.info("shutting down: draining in-flight requests")
    await stop()


async def serve_gateway(settings: Settings, *, on_ready: Callable[[GatewayServer], None] | None = None) -> None:
    """Run one gateway (HTTP + gRPC) until SIGINT/SIGTERM (`servoloop serve`): see `replica`."""
    system = replica(settings, on_ready=on_ready)
    await run_until_signalled(system.start, system.stop)


def replica(settings: Settings, *, on_ready: Callable[[GatewayServer], None] | None = None) -> System:
    """One gateway replica of a multi-process deployment (`servoloop serve`), as a `System`.

    With an external broker its events go there through its own spool; otherwise (the broker and the
    store belong to a `servoloop up` process) it serves without an event pipeline and says so. With a
    ClickHouse server as the store (`events.store.kind: clickhouse`) it also reads the store, as a client:
    spend budgets are enforced, feedback on inferences other replicas served is accepted, and the admin
    API answers. The store's owner alone (`servoloop up`, or the monitor and retrain workers) runs the
    monitors, the registry and the workers; a replica never does. An embedded chDB store belongs to one
    process, so a replica over it runs without budgets and says so.
    """
    pipeline = None
    if settings.events.broker.mode == "external":
        reads_store = settings.events.store.kind == "clickhouse"
        pipeline = lambda registry: EventPipeline(settings.events, data_dir=settings.data_dir,  # noqa: E731
                                                  registry=registry, ingest=False, with_store=reads_store)
        if settings.gateway.budgets.enabled and not reads_store:
            log.warning("servoloop serve: spend budgets are not enforced: they are read from the store, and an "
                        "embedded chDB store belongs to another process (use events.store.kind: clickhouse)")
    else:
        log.warning("servoloop serve: events.broker.mode is %r, so this gateway emits no events; use an external "
                    "broker for multi-process deployments (or `servoloop up`)", settings.events.broker.mode)
    return System(settings, pipeline, on_ready=on_ready, owner=False)


async def serve_all(settings: Settings, *, on_ready: Callable[[GatewayServer], None] | None = None) -> None:
    """`servoloop up`: the event pipeline (store, broker, sink, ingester) and the gateway in one process."""
    await _serve(settings, lambda registry: EventPipeline(settings.events, data_dir=settings.data_dir,
                                                          registry=registry), on_ready)


async def _serve(settings: Settings, make_pipeline: Callable[[CollectorRegistry], EventPipeline] | None,
                 on_ready: Callable[[GatewayServer], None] | None) -> None:
    system = System(settings, make_pipeline, on_ready=on_ready)
    await run_until_signalled(system.start, system.stop)


def all_in_one(settings: Settings, *, store: Store | None = None,
               engines: dict[str, Engine] | None = None,
               on_ready: Callable[[GatewayServer], None] | None = None) -> System:
    """`servoloop up`'s components as a `System` to start and stop yourself (e.g. `servoloop demo`).

    `store`: use this store instead of opening the configured one (a process holds one chDB path);
    `engines`: engines already started, by model name.
    """
    return System(settings, lambda registry: EventPipeline(settings.events, data_dir=settings.data_dir,
                                                           registry=registry, store=store),
                  on_ready=on_ready, engines=engines)


class System:
    """Every component of one serving process: `await start()`, then its handles, then `await stop()`.

    With a pipeline that owns a store, the process also runs the monitors, the registry (and its request
    worker), the retrain worker and the graders, as `servoloop up` does; `owner=False` (a `replica`) reads
    the store but runs none of them.
    """

    def __init__(self, settings: Settings, make_pipeline: Callable[[CollectorRegistry], EventPipeline] | None, *,
                 on_ready: Callable[[GatewayServer], None] | None = None,
                 engines: dict[str, Engine] | None = None, owner: bool = True) -> None:
        self.settings = settings
        self.owner = owner
        self.metrics = GatewayMetrics()  # one registry: the gateway's /metrics shows the sink, spool and ingester too
        self.pipeline = make_pipeline(self.metrics.registry) if make_pipeline is not None else None
        self.on_ready = on_ready
        self.engines = engines
        self.gateway: Gateway | None = None
        self.server: GatewayServer | None = None
        self.scheduler: Scheduler | None = None
        self.registry: StoreRegistry | None = None
        self.model_requests: RequestWorker | None = None  # applies model action requests through the one registry
        self.grading: GradingWorker | None = None
        self._grade_exporters: list[GradeExporter] = []  # grades to OTLP / Langfuse (grading.export)
        self._close_exporters: Callable[[], Awaitable[None]] | None = None
        if settings.grading.enabled and make_pipeline is not None and owner:  # a bad export setting fails before anything starts
            self._grade_exporters, self._close_exporters = grade_exporters(settings)
        self.retrain_worker: RetrainWorker | None = None
        self._retrain_stop = asyncio.Event()
        self._retrain_task: asyncio.Task[None] | None = None
        self.report_dir = settings.monitors.report_dir or settings.data_dir / "monitor-reports"  # drift HTML reports

    async def start(self) -> None:
        settings, pipeline, metrics, report_dir = self.settings, self.pipeline, self.metrics, self.report_dir
        if pipeline is not None:
            await pipeline.start()
        if pipeline is not None and self.owner:
            if pipeline.store is not None and pipeline.sink is not None and settings.monitors.enabled:
                # The store's owner runs the monitors; results and triggers travel through the sink like every event.
                self.scheduler = Scheduler(pipeline.store, settings.monitors, sink_publisher(pipeline.sink),
                                           report_dir=report_dir)
                await self.scheduler.start()
            if pipeline.store is not None and pipeline.sink is not None:
                # The store's owner runs the registry: its rows go to the store, then to the `models` topic.
                registry = StoreRegistry(pipeline.store, settings.data_dir / "artifacts", publish=pipeline.sink.publish)
                self.registry = registry
                self.model_requests = RequestWorker(registry, poll_s=1.0)
                await self.model_requests.start()
                if settings.retrain.enabled:  # triggers -> dataset -> training subprocess -> gate -> the same registry
                    self.retrain_worker = RetrainWorker(pipeline.store, registry, settings)
                    self._retrain_task = asyncio.create_task(self.retrain_worker.run(self._retrain_stop),
                                                             name="retrain-worker")
                if settings.grading.enabled:  # graders sample served traffic off the request path
                    self.grading = GradingWorker(pipeline.store, sink_publisher(pipeline.sink), settings.grading,
                                                 registry=metrics.registry, exporters=self._grade_exporters)
                    await self.grading.start()
        gw = Gateway(settings.gateway, KeyStore(settings.keys_path), metrics=metrics, engines=self.engines,
                     events=pipeline.sink if pipeline is not None else None,
                     prices=PriceTable.from_settings(settings.monitors.prices))  # spend: tokens x the monitors' prices
        self.gateway = gw
        _follow_models(gw, settings, pipeline)
        if pipeline is not None:
            gw.status_providers["events"] = pipeline.health
            if pipeline.store is not None:  # feedback on inferences another replica (or an earlier run) served
                gw.inference_owners.lookup = partial(_owns, pipeline.store)
                gw.http_extensions.append(admin_extension(  # the admin API and the operator dashboard (/admin)
                    pipeline.store, gw.auth.authenticate, publish=pipeline.sink.publish if pipeline.sink else None,
                    health=pipeline.health,
                    report_dir=report_dir,
                    prices={m: (p.input_per_1k, p.output_per_1k) for m, p in settings.monitors.prices.items()},
                    operator_tenants=settings.gateway.auth.operator_tenants))
                gw.http_extensions.append(models_extension(  # the registry's admin routes (versions, lineage)
                    pipeline.store, gw.auth.authenticate, publish=pipeline.sink.publish if pipeline.sink else None,
                    operator_tenants=settings.gateway.auth.operator_tenants))
                gw.http_extensions.append(release_extension(  # model cards and changelogs of registry versions
                    pipeline.store, gw.auth.authenticate, operator_tenants=settings.gateway.auth.operator_tenants))
                gw.http_extensions.append(budgets_extension(  # spend budgets: read and set (servoloop budgets)
                    pipeline.store, gw.auth.authenticate, publish=pipeline.sink.publish if pipeline.sink else None,
                    operator_tenants=settings.gateway.auth.operator_tenants))
                if settings.gateway.budgets.enabled:  # enforced from memory; seeded from and polled in the store
                    gw.follow_budgets(StoreBudgetSource(pipeline.store))
        self.server = GatewayServer(gw)
        await self.server.start()
        if self.on_ready:
            self.on_ready(self.server)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()  # drains in-flight requests: their events are published before the sink closes
        if self.scheduler is not None:
            await self.scheduler.aclose()
        if self.model_requests is not None:
            await self.model_requests.aclose()
        if self.grading is not None:
            await self.grading.aclose()
        if self._close_exporters is not None:
            await self._close_exporters()
        if self._retrain_task is not None:
            self._retrain_stop.set()  # between jobs it stops at once; a running job is killed (and resumes from its checkpoint)
            try:
                await asyncio.wait_for(self._retrain_task, 5.0)
            except TimeoutError:
                pass
        if self.pipeline is not None:
            await self.pipeline.aclose()


def grade_exporters(settings: Settings) -> tuple[list[GradeExporter], Callable[[], Awaitable[None]]]:
    """The grade exporters `grading.export` asks for, over the gateway's tracing destinations, and their closer.

    OTel: a tracer provider exporting to `gateway.tracing.endpoint` and/or Langfuse's OTLP endpoint; Langfuse
    scores: `gateway.tracing.langfuse` host and keys. Raises ConfigError when an export has no destination.
    """
    from feedback.graders.export import LangfuseGradeScores, OtelGradeExporter
    from gateway.tracing import tracer_provider

    export, tracing = settings.grading.export, settings.gateway.tracing
    exporters: list[GradeExporter] = []
    provider = tracer_provider(tracing) if export.otel else None
    if provider is not None:
        exporters.append(OtelGradeExporter(provider))
    scores = None
    if export.langfuse:
        lf = tracing.langfuse
        if not lf.host:
            raise ConfigError("grading.export.langfuse needs gateway.tracing.langfuse.host (and its keys)")
        scores = LangfuseGradeScores(lf.host, lf.public_key, lf.secret_key.get_secret_value(),
                                     retries=lf.score_retries, timeout_s=lf.timeout_s)
        exporters.append(scores)

    async def close() -> None:
        if scores is not None:
            await scores.aclose()
        if provider is not None:  # exports what is queued; blocking, so off the loop
            await asyncio.to_thread(provider.shutdown)

    return exporters, close


def _follow_models(gw: Gateway, settings: Settings, pipeline: EventPipeline | None) -> None:
    """Hot swap: the gateway follows the `models` topic of its broker, or polls the store when there is none."""
    hs = settings.gateway.hotswap
    if not hs.enabled or pipeline is None:
        if hs.enabled:
            log.warning("hot swap is off: this gateway has no broker and no store to learn model versions from")
        return
    cache_dir = hs.cache_dir or settings.data_dir / "adapters"
    if settings.events.broker.mode != "none":
        gw.follow_models(cache_dir=cache_dir, bootstrap_servers=pipeline.bootstrap_servers,
                         topic=topic_name(ModelEvent.topic, settings.events.broker.topic_prefix))
    elif pipeline.store is not None:
        gw.follow_models(cache_dir=cache_dir, poll=partial(_model_events, pipeline.store))


async def _model_events(store: Store) -> list[ModelEvent]:
    return [ModelEvent(**{**row, "canary_share": float(row["canary_share"] or 0.0)}) for row in await model_rows(store)]


async def _owns(store: Store, tenant: str, inference_id: str) -> bool:
    """Whether `tenant` may rate `inference_id`: one of its served inferences (a shadow replay was served to nobody)."""
    inference = await get_inference(store, tenant=tenant, event_id=inference_id)
    return inference is not None and not inference.shadow


def run(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
