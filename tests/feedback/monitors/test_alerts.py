"""Webhook alerts against a real HTTP server (aiohttp): JSON body, retries with backoff, bounded attempts."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from feedback.monitors.alerts import Alert, WebhookNotifier
from feedback.monitors.settings import WebhookSettings


@dataclass
class Receiver:
    """A webhook that answers the queued statuses first, then 200; records every request."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()

    async def hook(request: web.Request) -> web.Response:
        rec.bodies.append(await request.json())
        rec.headers.append(dict(request.headers))
        return web.Response(status=rec.statuses.pop(0) if rec.statuses else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()


def alert() -> Alert:
    return Alert(event="fired", monitor="satisfaction_drop", metric="thumbs_up_rate", action="retrain",
                 tenant="acme", model="chat", model_version="v1", value=0.6, baseline=0.8, threshold=0.05,
                 p_value=1e-9, sample_size=300, monitor_event_id="m-1", trigger_event_id="t-1")


def settings(url: str, **kw: object) -> WebhookSettings:
    return WebhookSettings(url=url, backoff_s=0.01, max_backoff_s=0.05, timeout_s=2, **kw)  # type: ignore[arg-type]


async def test_an_alert_is_posted_as_json_with_the_configured_headers(receiver: Receiver) -> None:
    notifier = WebhookNotifier(settings(receiver.url, headers={"Authorization": "Bearer s3cret"}))
    assert await notifier.send(alert())
    await notifier.aclose()
    [body] = receiver.bodies
    assert body["event"] == "fired" and body["monitor"] == "satisfaction_drop" and body["baseline"] == 0.8
    assert body["trigger_event_id"] == "t-1"
    assert receiver.headers[0]["Authorization"] == "Bearer s3cret"
    assert receiver.headers[0]["Content-Type"] == "application/json"


async def test_server_errors_and_429_are_retried_until_accepted(receiver: Receiver) -> None:
    receiver.statuses = [503, 429, 500]
    notifier = WebhookNotifier(settings(receiver.url, retries=4))
    assert await notifier.send(alert())
    assert len(receiver.bodies) == 4 and notifier.delivered == 1
    await notifier.aclose()


async def test_retries_are_bounded_and_a_client_error_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [503] * 10
    notifier = WebhookNotifier(settings(receiver.url, retries=2))
    assert not await notifier.send(alert())
    assert len(receiver.bodies) == 3 and notifier.failed == 1

    receiver.statuses, receiver.bodies = [400], []
    assert not await notifier.send(alert())
    assert len(receiver.bodies) == 1
    await notifier.aclose()


async def test_an_unreachable_webhook_gives_up_in_bounded_time() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notifier = WebhookNotifier(settings(f"http://127.0.0.1:{port}/hook", retries=3))
    started = time.monotonic()
    assert not await notifier.send(alert())
    assert time.monotonic() - started < 2
    await notifier.aclose()


def test_an_alert_serialises_to_plain_json() -> None:
    import msgspec

    assert json.loads(msgspec.json.encode(alert()))["p_value"] == 1e-9
