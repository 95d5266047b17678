"""Wiring only: run the components of `servoloop up` / `servoloop serve` in one process until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial

from prometheus_client import CollectorRegistry

from feedback.dashboard import admin_extension
from feedback.dashboard.models_api import models_extension
from feedback.graders.worker import GradingWorker
from feedback.monitors.runner import Scheduler, sink_publisher
from feedback.pipeline import EventPipeline
from feedback.store import Store, get_inference
from gateway.auth import KeyStore
from gateway.metrics import GatewayMetrics
from gateway.server import Gateway, GatewayServer
from retrain.registry import StoreRegistry, model_rows
from retrain.requests import RequestWorker
from retrain.worker import RetrainWorker
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
    """Run one gateway (HTTP + gRPC) until SIGINT/SIGTERM (`servoloop serve`).

    With an external broker its events go there through its own spool; otherwise (the broker and the
    store belong to a `servoloop up` process) it serves without an event pipeline and says so.
    """
    pipeline = None
    if settings.events.broker.mode == "external":
        pipeline = lambda registry: EventPipeline(settings.events, data_dir=settings.data_dir,  # noqa: E731
                                                  registry=registry, ingest=False, with_store=False)
    else:
        log.warning("servoloop serve: events.broker.mode is %r, so this gateway emits no events; use an external "
                    "broker for multi-process deployments (or `servoloop up`)", settings.events.broker.mode)
    await _serve(settings, pipeline, on_ready)


async def serve_all(settings: Settings, *, on_ready: Callable[[GatewayServer], None] | None = None) -> None:
    """`servoloop up`: the event pipeline (store, broker, sink, ingester) and the gateway in one process."""
    await _serve(settings, lambda registry: EventPipeline(settings.events, data_dir=settings.data_dir,
                                                          registry=registry), on_ready)


async def _serve(settings: Settings, make_pipeline: Callable[[CollectorRegistry], EventPipeline] | None,
                 on_ready: Callable[[GatewayServer], None] | None) -> None:
    metrics = GatewayMetrics()  # one registry: the gateway's /metrics shows the sink, spool and ingester too
    pipeline = make_pipeline(metrics.registry) if make_pipeline is not None else None
    server: GatewayServer | None = None
    scheduler: Scheduler | None = None
    model_requests: RequestWorker | None = None  # applies model action requests through the one registry of this process
    grading: GradingWorker | None = None
    retrain_stop = asyncio.Event()
    retrain_task: asyncio.Task[None] | None = None
    report_dir = settings.monitors.report_dir or settings.data_dir / "monitor-reports"  # drift HTML reports

    async def start() -> None:
        nonlocal server, scheduler, model_requests, grading, retrain_task
        if pipeline is not None:
            await pipeline.start()
            if pipeline.store is not None and pipeline.sink is not None and settings.monitors.enabled:
                # The store's owner runs the monitors; results and triggers travel through the sink like every event.
                scheduler = Scheduler(pipeline.store, settings.monitors, sink_publisher(pipeline.sink),
                                      report_dir=report_dir)
                await scheduler.start()
            if pipeline.store is not None and pipeline.sink is not None:
                # The store's owner runs the registry: its rows go to the store, then to the `models` topic.
                registry = StoreRegistry(pipeline.store, settings.data_dir / "artifacts", publish=pipeline.sink.publish)
                model_requests = RequestWorker(registry, poll_s=1.0)
                await model_requests.start()
                if settings.retrain.enabled:  # triggers -> dataset -> training subprocess -> gate -> the same registry
                    retrain_task = asyncio.create_task(
                        RetrainWorker(pipeline.store, registry, settings).run(retrain_stop), name="retrain-worker")
                if settings.grading.enabled:  # graders sample served traffic off the request path
                    grading = GradingWorker(pipeline.store, sink_publisher(pipeline.sink), settings.grading,
                                            registry=metrics.registry)
                    await grading.start()
        gw = Gateway(settings.gateway, KeyStore(settings.keys_path), metrics=metrics,
                     events=pipeline.sink if pipeline is not None else None)
        _follow_models(gw, settings, pipeline)
        if pipeline is not None:
            gw.status_providers["events"] = pipeline.health
            if pipeline.store is not None:  # feedback on inferences another replica (or an earlier run) served
                gw.inference_owners.lookup = partial(_owns, pipeline.store)
                gw.http_extensions.append(admin_extension(  # the admin API and the operator dashboard (/admin)
                    pipeline.store, gw.auth.authenticate, publish=pipeline.sink.publish if pipeline.sink else None,
                    health=pipeline.health,
                    report_dir=report_dir,
                    prices={m: (p.input_per_1k, p.output_per_1k) for m, p in settings.monitors.prices.items()}))
                gw.http_extensions.append(models_extension(  # the registry's admin routes (versions, lineage)
                    pipeline.store, gw.auth.authenticate, publish=pipeline.sink.publish if pipeline.sink else None))
        server = GatewayServer(gw)
        await server.start()
        if on_ready:
            on_ready(server)

    async def stop() -> None:
        if server is not None:
            await server.stop()  # drains in-flight requests: their events are published before the sink closes
        if scheduler is not None:
            await scheduler.aclose()
        if model_requests is not None:
            await model_requests.aclose()
        if grading is not None:
            await grading.aclose()
        if retrain_task is not None:
            retrain_stop.set()  # between jobs it stops at once; a running job is killed (and resumes from its checkpoint)
            try:
                await asyncio.wait_for(retrain_task, 5.0)
            except TimeoutError:
                pass
        if pipeline is not None:
            await pipeline.aclose()

    await run_until_signalled(start, stop)


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
    return await get_inference(store, tenant=tenant, event_id=inference_id) is not None


def run(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
