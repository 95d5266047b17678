"""Wiring only: run the components of `servoloop up` / `servoloop serve` in one process until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from gateway.auth import KeyStore
from gateway.server import Gateway, GatewayServer
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
    """Run one gateway (HTTP + gRPC) until SIGINT/SIGTERM."""
    gw = Gateway(settings.gateway, KeyStore(settings.keys_path))
    server = GatewayServer(gw)

    async def start() -> None:
        await server.start()
        if on_ready:
            on_ready(server)

    await run_until_signalled(start, server.stop)


def run(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
