"""`servoloop retrain …`: run the retrain pipeline for one trigger by hand, list outcomes.

Needs the store: with the embedded chDB store only while `servoloop up` is not running (one process per
data directory); with a ClickHouse server at any time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="Retraining: run a trigger's job (dataset, training, gate, registry) by hand.",
                  no_args_is_help=True)
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]


@app.command()
def run(
    trigger_id: Annotated[str | None, typer.Option("--trigger-id", help="a retrain_triggers event id")] = None,
    model: Annotated[str | None, typer.Option(help="retrain this model (a manual trigger is recorded)")] = None,
    method: Annotated[str, typer.Option(help="dpo or sft")] = "dpo",
    window_hours: Annotated[float | None, typer.Option(help="feedback window ending now (default: settings)")] = None,
    tenant: Annotated[str, typer.Option(help="only this tenant's feedback")] = "",
    config: ConfigOpt = None,
) -> None:
    """Build the dataset, train in a subprocess, gate, register (or reject) — for one trigger, now."""
    from servoloop.settings import load_settings

    if (trigger_id is None) == (model is None):
        raise typer.BadParameter("give exactly one of --trigger-id or --model")
    if method not in ("dpo", "sft"):
        raise typer.BadParameter("--method must be dpo or sft")
    settings = load_settings(config).with_default_model()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    outcome = asyncio.run(_run(settings, trigger_id, model, method, window_hours, tenant))
    console.print(f"[bold]{outcome['outcome']}[/bold] {outcome['model']} {outcome['version_id']} "
                  f"{'; '.join(outcome['reasons'])}")
    print(json.dumps(outcome, default=str))


async def _run(settings: Any, trigger_id: str | None, model: str | None, method: str, window_hours: float | None,
               tenant: str) -> dict[str, Any]:
    from feedback.store import migrate, open_store, write_events
    from retrain.registry import StoreRegistry
    from retrain.worker import RetrainWorker, get_trigger
    from schemas.events import RetrainTrigger, now_ms

    store = await open_store(settings.events.store, data_dir=settings.data_dir)
    try:
        await migrate(store)
        if trigger_id is not None:
            trigger = await get_trigger(store, trigger_id)
        else:
            end = now_ms()
            start = end - int((window_hours * 3600 if window_hours else settings.retrain.default_window_s) * 1000)
            trigger = RetrainTrigger(tenant=tenant, model=model or "", method=method,  # type: ignore[arg-type]
                                     reason="manual: servoloop retrain run", actor="cli",
                                     window_start_ms=start, window_end_ms=end)
            await write_events(store, [trigger])
        registry = StoreRegistry(store, settings.data_dir / "artifacts")
        outcome = await RetrainWorker(store, registry, settings).handle(trigger)
        return outcome.as_dict()
    finally:
        await store.aclose()


@app.command("outcomes")
def list_outcomes(config: ConfigOpt = None,
                  trigger_id: Annotated[str | None, typer.Option("--trigger-id")] = None) -> None:
    """Recorded outcomes of retrain jobs, newest first, as JSON lines."""
    from servoloop.settings import load_settings

    settings = load_settings(config)

    async def go() -> list[dict[str, Any]]:
        from feedback.store import open_store
        from retrain.worker import outcomes

        store = await open_store(settings.events.store, data_dir=settings.data_dir)
        try:
            return await outcomes(store, trigger_id=trigger_id)
        finally:
            await store.aclose()

    for row in asyncio.run(go()):
        print(json.dumps(row, default=str))


@app.command("worker")
def worker(config: ConfigOpt = None) -> None:
    """Handle retrain triggers as they arrive, one job at a time, until SIGTERM (the training worker process).

    Also applies model action requests (canary monitor, dashboard) through its registry, as `servoloop up` does:
    run one of these per store. Needs a ClickHouse server (events.store.kind: clickhouse) unless no
    `servoloop up` owns the chDB store. With an external broker, registry steps also go to the `models` topic
    (gateways follow it).
    """
    from servoloop.settings import load_settings

    settings = load_settings(config).with_default_model()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_work(settings))


async def _work(settings: Any) -> None:
    import signal

    from feedback.store import migrate, open_store
    from retrain.registry import StoreRegistry
    from retrain.requests import RequestWorker
    from retrain.worker import RetrainWorker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    store = await open_store(settings.events.store, data_dir=settings.data_dir)
    sink = None
    requests: RequestWorker | None = None
    try:
        await migrate(store)
        if settings.events.broker.mode == "external":
            from feedback.sink import build_event_sink

            sink = build_event_sink(settings.events, spool_dir=settings.data_dir / "retrain-worker-spool")
            await sink.start()
        registry = StoreRegistry(store, settings.data_dir / "artifacts",
                                 publish=sink.publish if sink is not None else None)
        requests = RequestWorker(registry, poll_s=1.0)  # the store's one registry writer, as in `servoloop up`
        await requests.start()
        await RetrainWorker(store, registry, settings).run(stop)
    finally:
        if requests is not None:
            await requests.aclose()
        if sink is not None:
            await sink.aclose()
        await store.aclose()
