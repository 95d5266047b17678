"""Alert delivery: one JSON POST per fired or resolved incident, retried with capped backoff, bounded in time."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Literal

import httpx
import msgspec

from feedback.monitors.settings import WebhookSettings

log = logging.getLogger(__name__)


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator is told: which monitor, about whom, the evidence, and what was done."""

    event: Literal["fired", "resolved"]
    monitor: str
    metric: str
    action: Literal["alert", "retrain", "promote", "rollback"]  # promote/rollback: the canary monitor's requests
    tenant: str
    model: str
    model_version: str
    canary_arm: str = ""
    value: float | None = None
    baseline: float | None = None
    threshold: float = 0.0
    p_value: float | None = None
    sample_size: int = 0
    window_start_ms: int = 0
    window_end_ms: int = 0
    ts_ms: int = 0
    reason: str = ""
    monitor_event_id: str = ""
    trigger_event_id: str = ""


class WebhookNotifier:
    """POSTs alerts as JSON to one URL. Retries connection errors, timeouts, 429 and 5xx; other 4xx are final.

    `send` never raises: it returns whether the webhook accepted the alert, after at most
    `1 + retries` attempts (so its time is bounded by the settings).
    """

    def __init__(self, settings: WebhookSettings, *, client: httpx.AsyncClient | None = None):
        self.settings = settings
        self._client = client or httpx.AsyncClient(timeout=settings.timeout_s)
        self._own_client = client is None
        self.delivered = 0
        self.failed = 0

    async def send(self, alert: Alert) -> bool:
        s = self.settings
        body = msgspec.json.encode(alert)
        headers = {"content-type": "application/json", **s.headers}
        for attempt in range(s.retries + 1):
            retry = True
            try:
                r = await self._client.post(s.url, content=body, headers=headers)
                if r.status_code < 300:
                    self.delivered += 1
                    return True
                retry = r.status_code == 429 or r.status_code >= 500
                why = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            if not retry or attempt == s.retries:
                log.warning("alert %s/%s not delivered to the webhook: %s", alert.monitor, alert.event, why)
                break
            delay = min(s.max_backoff_s, s.backoff_s * 2**attempt)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # jitter: replicas do not retry in step
        self.failed += 1
        return False

    async def send_all(self, alerts: Sequence[Alert]) -> int:
        """Send concurrently; return how many were delivered."""
        results = await asyncio.gather(*(self.send(a) for a in alerts))
        return sum(results)

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()
