"""Langfuse: the OTLP destination for the gateway's spans, and user ratings as Langfuse scores.

Spans reach Langfuse through its OTLP endpoint, `{host}/api/public/otel/v1/traces`, with HTTP basic
auth (public key : secret key); `gateway/tracing.py` builds that exporter from the helpers here.
Scores do not travel over OTLP: each accepted rating is posted to `{host}/api/public/scores` as one
JSON object naming the rated inference's trace (`traceId`). The score's `id` is the feedback event's
id, so a retried post updates the same score instead of adding one.

The forwarder never blocks or fails its caller: ratings wait in a bounded queue (newer ones are
dropped and counted when it is full) and background workers post them, retrying with exponential
backoff on network errors, 429 and 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from gateway.service import Outcome
    from gateway.settings import LangfuseSettings
    from schemas.events import FeedbackEvent

log = logging.getLogger(__name__)

OTLP_PATH = "/api/public/otel/v1/traces"
SCORES_PATH = "/api/public/scores"


def basic_auth(public_key: str, secret_key: str) -> str:
    return "Basic " + base64.b64encode(f"{public_key}:{secret_key}".encode()).decode()


def otlp_traces_url(host: str) -> str:
    return host.rstrip("/") + OTLP_PATH


def otlp_headers(settings: LangfuseSettings) -> dict[str, str]:
    """Headers for Langfuse's OTLP endpoint: basic auth, and the ingestion version its docs ask for."""
    return {"Authorization": basic_auth(settings.public_key, settings.secret_key.get_secret_value()),
            "x-langfuse-ingestion-version": "4"}


def score_body(event: FeedbackEvent, trace_id: str) -> dict[str, Any]:
    """The Langfuse score for one rating: thumbs BOOLEAN (1/0), rating NUMERIC, the other kinds CATEGORICAL."""
    body: dict[str, Any] = {"id": event.event_id, "traceId": trace_id, "name": event.metric_name,
                            "metadata": {"inference_id": event.target_id, "kind": event.kind, "tenant": event.tenant}}
    if event.kind == "thumbs":
        body["value"], body["dataType"] = (1 if event.thumbs else 0), "BOOLEAN"
    elif event.kind == "rating":
        body["value"], body["dataType"] = event.rating, "NUMERIC"
    elif event.kind == "preference":
        body["value"] = "preferred" if event.target_id == event.preferred_id else "rejected"
        body["dataType"] = "CATEGORICAL"
        body["metadata"].update(preferred_id=event.preferred_id, other_id=event.other_id)
    else:  # comment, correction: the text is the point; the value only says which
        body["value"], body["dataType"] = ("corrected" if event.kind == "correction" else "comment"), "CATEGORICAL"
    comment = event.comment or event.correction
    if comment:
        body["comment"] = comment
    return body


class TraceIndex:
    """The trace id of each recent recorded inference, by inference id (the oldest are forgotten)."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._ids: OrderedDict[str, str] = OrderedDict()

    def __call__(self, outcome: Outcome) -> None:
        """The finish observer: remember requests whose spans were recorded (others have no trace to score)."""
        adm = outcome.admission
        if adm.sampled:
            self._ids[adm.id] = adm.request.trace_id
            if len(self._ids) > self._capacity:
                self._ids.popitem(last=False)

    def get(self, inference_id: str) -> str | None:
        return self._ids.get(inference_id)


class LangfuseScores:
    """Feedback observer: each accepted rating becomes a Langfuse score, posted in the background.

    Call it on the gateway's event loop. Ratings of inferences whose trace this gateway does not know
    (not recorded, forgotten, or served elsewhere) are counted as `unlinked` and not sent.
    """

    def __init__(self, settings: LangfuseSettings, index: TraceIndex, *, workers: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, registry: CollectorRegistry | None = None):
        assert settings.host
        self._settings = settings
        self._index = index
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(settings.score_queue_size)
        self._workers = workers
        self._backoff_s, self._max_backoff_s = backoff_s, max_backoff_s
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self.stats = {"queued": 0, "sent": 0, "dropped": 0, "failed": 0, "unlinked": 0, "retries": 0}
        if registry is not None:
            registry.register(_ScoresCollector(self))

    @property
    def depth(self) -> int:
        """Scores waiting in the queue (bounded by tracing.langfuse.score_queue_size)."""
        return self._queue.qsize()

    def __call__(self, event: FeedbackEvent) -> None:
        try:
            trace_id = self._index.get(event.target_id)
            if trace_id is None:
                self.stats["unlinked"] += 1
                return
            self._queue.put_nowait(score_body(event, trace_id))
            self.stats["queued"] += 1
        except asyncio.QueueFull:
            self.stats["dropped"] += 1
            log.warning("Langfuse score queue full (%d); dropping the score of %s", self._queue.maxsize,
                        event.target_id)
        except Exception:  # a rating must be accepted whatever happens here
            log.exception("Langfuse score not queued")

    async def start(self) -> None:
        s = self._settings
        self._client = httpx.AsyncClient(
            base_url=(s.host or "").rstrip("/"), timeout=s.timeout_s,
            headers={"Authorization": basic_auth(s.public_key, s.secret_key.get_secret_value())})
        self._tasks = [asyncio.create_task(self._work(), name=f"langfuse-scores-{i}") for i in range(self._workers)]

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for up to `timeout_s`), then stop."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout_s)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _work(self) -> None:
        while True:
            body = await self._queue.get()
            try:
                await self._send(body)
            except Exception:
                self.stats["failed"] += 1
                log.exception("Langfuse score for trace %s not sent", body.get("traceId"))
            finally:
                self._queue.task_done()

    async def _send(self, body: dict[str, Any]) -> None:
        assert self._client is not None
        for attempt in range(self._settings.score_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                delay = min(self._backoff_s * 2 ** (attempt - 1), self._max_backoff_s)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                r = await self._client.post(SCORES_PATH, json=body)
            except httpx.TransportError as e:
                log.warning("Langfuse scores: %s (attempt %d)", e, attempt + 1)
                continue
            if r.status_code < 300:
                self.stats["sent"] += 1
                return
            if r.status_code != 429 and r.status_code < 500:
                self.stats["failed"] += 1
                log.warning("Langfuse refused a score (%d): %s", r.status_code, r.text[:200])
                return
            log.warning("Langfuse scores: HTTP %d (attempt %d)", r.status_code, attempt + 1)
        self.stats["failed"] += 1
        log.error("Langfuse score for trace %s dropped after %d attempts", body["traceId"],
                  self._settings.score_retries + 1)


class _ScoresCollector:
    """The score queue's depth and bound, and what became of the scores (servoloop_langfuse_*)."""

    def __init__(self, scores: LangfuseScores):
        self._scores = scores

    def collect(self) -> Iterator[Metric]:
        s = self._scores
        yield GaugeMetricFamily("servoloop_langfuse_score_queue_depth", "Langfuse scores waiting to be posted",
                                value=s.depth)
        yield GaugeMetricFamily("servoloop_langfuse_score_queue_capacity", "Bound of the Langfuse score queue",
                                value=s._queue.maxsize)
        c = CounterMetricFamily("servoloop_langfuse_scores", "Langfuse scores by outcome", labels=["outcome"])
        for outcome, n in s.stats.items():
            c.add_metric([outcome], n)
        yield c
