"""`servoloop ingest`: one ingester process, a member of the consumer group that fills the store.

Wiring only (the loop is `feedback.ingest.run_ingester`): settings, logging, signals, a metrics port.
Run as many as the topics have partitions; each commits offsets only after its batch is stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger("servoloop.ingest")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]


def ingest(
    config: ConfigOpt = None,
    progress_every: Annotated[float, typer.Option("--progress-every", min=0.1,
                                                  help="seconds between progress lines (events/s, lag)")] = 5.0,
    metrics_port: Annotated[int, typer.Option("--metrics-port", min=0, max=65535,
                                              help="serve Prometheus /metrics on this port (0: off)")] = 0,
) -> None:
    """Consume the event topics of an external Kafka broker into the store (chDB or a ClickHouse server).

    Needs events.broker.mode: external and its bootstrap_servers. The store (events.store) is migrated first.

    SIGTERM or Ctrl-C: the batch at hand is stored and committed, or left uncommitted for the group.

    A second signal exits at once (offsets are still committed only for stored batches).
    """
    from prometheus_client import CollectorRegistry

    from servoloop.settings import load_settings

    settings = load_settings(config)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = CollectorRegistry()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=registry)
        log.info("metrics on :%d/metrics", metrics_port)

    async def main() -> None:
        from feedback.ingest import run_ingester

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                log.warning("%s again: exiting now; the batch in hand stays uncommitted", sig.name)
                os._exit(128 + sig.value)
            log.info("%s: stopping after the batch in hand", sig.name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await run_ingester(settings.events, data_dir=settings.data_dir, stop=stop, registry=registry,
                           progress_every_s=progress_every)

    asyncio.run(main())


TOP_LEVEL = {"ingest": ingest}
