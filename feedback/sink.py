"""The gateway's event sink: `publish()` costs microseconds; a background forwarder delivers through the spool.

Every published event is framed as an `EventRecord` (topic, key, event id, encoded event) and appended to the
`Spool`, which keeps it in memory while the downstream keeps up and writes it to disk when the downstream is slow,
down or the memory budget is spent. One forwarder task reads the spool in order and hands batches to a
`Downstream` (Kafka via confluent-kafka or kafka-python, or the store itself with no broker); a batch is
acknowledged in the spool only once the downstream confirmed every record of it, otherwise it is sent again
(with capped exponential backoff) when the downstream comes back. So nothing accepted is dropped, the order is
kept, and delivery is at-least-once (consumers deduplicate by event id).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from feedback.settings import EventSettings
from feedback.spool import Spool, SpoolError, SpoolHealth, SpoolRecord
from schemas.errors import ErrorKind, ServoloopError
from schemas.events import Event

log = logging.getLogger(__name__)


class EventRecord(msgspec.Struct, array_like=True, frozen=True):
    """What the sink spools and a downstream delivers: an event encoded, addressed and keyed."""

    topic: str
    key: bytes
    event_id: str
    value: bytes


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(EventRecord)


def encode_record(record: EventRecord) -> bytes:
    return _record_encoder.encode(record)


def decode_record(data: bytes) -> EventRecord:
    """Raises msgspec.DecodeError on bytes that are not an EventRecord."""
    return _record_decoder.decode(data)


class DownstreamUnavailable(ServoloopError):
    """The downstream did not confirm a batch (broker down, timeout, store failure): send it again later."""

    kind = ErrorKind.UNAVAILABLE
    code = "event_downstream_unavailable"


class Downstream(Protocol):
    """Where the spool's records go. `send` returns once every record is durably accepted, else raises."""

    async def send(self, records: Sequence[EventRecord]) -> None:
        """Deliver all of `records`, in order per key. Raises DownstreamUnavailable (nothing then counts as sent)."""
        ...

    async def aclose(self) -> None: ...


class SinkHealth(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # the downstream fails or stalls; events wait in the spool (memory, then disk)
    FAILING = "failing"  # events are being refused (spool over its cap, or closed)


class EventSink(Protocol):
    """The gateway's seam for events: `publish` never blocks and never raises."""

    def publish(self, event: Event) -> None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def health(self) -> SinkHealth: ...


class DurableEventSink:
    """EventSink over a Spool and a Downstream. Call `publish` on the event loop thread that runs `start()`.

    `aclose()` delivers what it can within `close_timeout_s`; the rest stays in the spool for the next start.
    """

    def __init__(
        self,
        spool: Spool,
        downstream: Downstream,
        *,
        topic_prefix: str = "servoloop.",
        encode: Callable[[Event], bytes] | None = None,
        registry: CollectorRegistry | None = None,
        batch_max_records: int = 5_000,
        batch_max_bytes: int = 4 * 1024**2,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        stall_s: float = 2.0,
        close_timeout_s: float = 10.0,
        retain_until_stored: bool = False,
        max_unconfirmed: int = 500_000,
    ):
        if encode is None:
            from schemas.events import encode_event as encode
        self._spool, self._downstream, self._encode = spool, downstream, encode
        self._prefix = topic_prefix
        self._topics: dict[type, str] = {}
        self._batch_records, self._batch_bytes = batch_max_records, batch_max_bytes
        self._backoff_initial, self._backoff_max = backoff_initial_s, backoff_max_s
        self._stall_s, self._close_timeout = stall_s, close_timeout_s
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._sending_since: float | None = None
        self._failing_since: float | None = None
        self.published = self.delivered = self.send_failures = 0
        self.rejected: Counter[str] = Counter()
        self._last_reject_log = self._last_failure_log = -1e9
        # Retain mode: a delivered batch stays in the spool until `confirm` reports every event in it stored.
        self._retain, self._max_unconfirmed = retain_until_stored, max_unconfirmed
        self._unconfirmed: dict[str, list[int]] = {}  # event id -> its batch's [last seq, events unconfirmed]
        self._delivered_batches: deque[list[int]] = deque()
        self.redeliveries = 0
        self._send_seconds = None
        if registry is not None:
            self._send_seconds = Histogram("servoloop_sink_batch_send_seconds", "Time for the downstream to confirm a batch",
                                           registry=registry, buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 5, 30))
            registry.register(_SinkCollector(self))

    # -- the request path ------------------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Accept `event` for delivery: no disk wait, never blocks, never raises (refusals are counted and logged)."""
        self.publish_many((event,))

    def publish_many(self, events: Sequence[Event]) -> None:
        """Accept `events` together (a request's events: one spool append, one write). Never raises."""
        try:
            records = [self._record(e) for e in events]
        except Exception as e:  # an event that does not encode: a bug upstream, not a reason to fail a request
            self._reject("unencodable", e, len(events))
            return
        try:
            self._spool.append_many(records)
        except SpoolError as e:
            self._reject(e.code, e, len(events))
            return
        self.published += len(events)
        self._wakeup.set()

    def _record(self, event: Event) -> bytes:
        cls = type(event)
        topic = self._topics.get(cls)
        if topic is None:
            topic = self._topics[cls] = self._prefix + cls.topic
        return _record_encoder.encode(EventRecord(topic, event.partition_key(), event.event_id, self._encode(event)))

    def _reject(self, reason: str, error: Exception, n: int = 1) -> None:
        self.rejected[reason] += n
        now = time.monotonic()
        if now - self._last_reject_log > 5.0:
            self._last_reject_log = now
            log.error("event sink refused events (%s, %d so far): %s", reason, sum(self.rejected.values()), error)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start forwarding (records left in the spool by an earlier run go first)."""
        if self._task is None:
            self._task = asyncio.create_task(self._forward(), name="event-sink-forwarder")

    async def aclose(self) -> None:
        """Deliver what the downstream takes within close_timeout_s, then close; what is left stays on disk."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self._close_timeout)
            except TimeoutError:
                log.warning("event sink: %d events not delivered at close; they stay in the spool", self._spool.pending)
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._downstream.aclose()
        await asyncio.to_thread(self._spool.close)

    def health(self) -> SinkHealth:
        spool = self._spool.health
        if spool == SpoolHealth.FULL:
            return SinkHealth.FAILING
        now = time.monotonic()
        stalled = self._sending_since is not None and now - self._sending_since > self._stall_s
        if self._failing_since is not None or stalled or spool == SpoolHealth.SPILLING:
            return SinkHealth.DEGRADED
        return SinkHealth.OK

    @property
    def pending(self) -> int:
        """Events accepted and not yet confirmed by the downstream."""
        return self._spool.pending

    # -- retain mode: the spool is the durable copy until the store has the event ---------------------------------

    def confirm(self, event_ids: Iterable[str]) -> None:
        """The store holds these events: release, in order, every delivered batch now wholly stored.

        Only meaningful with `retain_until_stored` (a broker that may lose what it acknowledged, such as the
        embedded broker on memory storage); otherwise a no-op. Call it on the sink's event loop.
        """
        if not self._retain:
            return
        unconfirmed = self._unconfirmed
        for event_id in event_ids:
            entry = unconfirmed.pop(event_id, None)
            if entry is not None:
                entry[1] -= 1
        batches, last = self._delivered_batches, -1
        while batches and batches[0][1] <= 0:
            last = batches.popleft()[0]
        if last >= 0:
            self._spool.ack(last)
            self._wakeup.set()

    def redeliver(self) -> None:
        """Send every delivered-but-unstored event again (the broker lost them, e.g. it restarted empty).

        The store deduplicates by event id, so events that did arrive meanwhile are harmless repeats.
        """
        if not self._retain:
            return
        self.redeliveries += len(self._unconfirmed)
        self._unconfirmed.clear()
        self._delivered_batches.clear()
        self._spool.rewind()
        self._wakeup.set()

    @property
    def unconfirmed(self) -> int:
        """Events delivered to the broker and not yet confirmed stored (retain mode)."""
        return len(self._unconfirmed)

    async def wait_delivered(self, timeout_s: float) -> bool:
        """Wait until every accepted event is confirmed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._spool.pending > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # -- the forwarder -------------------------------------------------------------------------------------------

    async def _read(self) -> list[SpoolRecord]:
        if self._spool.needs_disk_read():
            return await asyncio.to_thread(self._spool.read, self._batch_records, self._batch_bytes)
        return self._spool.read(self._batch_records, self._batch_bytes)

    async def _forward(self) -> None:
        backoff = self._backoff_initial
        while True:
            self._wakeup.clear()
            if self._retain and len(self._unconfirmed) >= self._max_unconfirmed:
                batch = []  # back-pressure: the spool holds the rest until the store catches up
            else:
                batch = await self._read()
            if not batch:
                if self._closing and not self._delivered_batches:
                    return
                try:
                    await asyncio.wait_for(self._wakeup.wait(), 0.5)
                except TimeoutError:
                    pass
                continue
            records = _decode_batch(batch)
            self._sending_since = started = time.monotonic()
            try:
                await self._downstream.send(records)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.send_failures += 1
                if self._failing_since is None:
                    self._failing_since = started
                if started - self._last_failure_log > 30.0:
                    self._last_failure_log = started
                    log.warning("event sink: downstream failing for %.0fs (%s); %d events wait in the spool",
                                started - self._failing_since, e, self._spool.pending)
                self._spool.rewind()
                self._spool.spill()
                if self._closing:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            finally:
                self._sending_since = None
            if self._retain:
                entry = [batch[-1].seq, 0]
                for r in records:
                    if r.event_id not in self._unconfirmed:
                        self._unconfirmed[r.event_id] = entry
                        entry[1] += 1
                self._delivered_batches.append(entry)
                if entry[1] == 0:
                    self.confirm(())
            else:
                self._spool.ack(batch[-1].seq)
            self.delivered += len(batch)
            if self._send_seconds is not None:
                self._send_seconds.observe(time.monotonic() - started)
            if self._failing_since is not None:
                log.info("event sink: downstream back after %.1fs", time.monotonic() - self._failing_since)
                self._failing_since = None
            backoff = self._backoff_initial


def _decode_batch(batch: list[SpoolRecord]) -> list[EventRecord]:
    out = []
    for rec in batch:
        try:
            out.append(_record_decoder.decode(rec.payload))
        except msgspec.DecodeError:  # CRC-checked bytes we wrote ourselves: only a code change gets here
            log.error("event sink: spooled record %d is not an EventRecord; skipped", rec.seq)
    return out


class _SinkCollector:
    def __init__(self, sink: DurableEventSink):
        self._sink = sink

    def collect(self) -> Iterator[Metric]:
        s = self._sink
        yield CounterMetricFamily("servoloop_sink_published_events", "Events accepted by publish()", value=s.published)
        yield CounterMetricFamily("servoloop_sink_delivered_events", "Events confirmed by the downstream", value=s.delivered)
        yield CounterMetricFamily("servoloop_sink_send_failures", "Batches the downstream did not confirm", value=s.send_failures)
        rejected = CounterMetricFamily("servoloop_sink_rejected_events", "Events refused by publish()", labels=["reason"])
        for reason, n in s.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily("servoloop_sink_pending_events", "Events accepted, not yet confirmed", value=s.pending)
        health = s.health()
        g = GaugeMetricFamily("servoloop_sink_health", "1 for the current health state", labels=["state"])
        for state in SinkHealth:
            g.add_metric([state.value], 1.0 if state == health else 0.0)
        yield g


class StoreDownstream:
    """No broker: records go straight to the store. `write(values)` gets the encoded events of one batch.

    `write` may be sync (run in a thread) or async; any exception makes the batch count as not delivered.
    """

    def __init__(self, write: Callable[[list[bytes]], Awaitable[Any] | Any]):
        self._write = write
        self._is_async = inspect.iscoroutinefunction(write)

    @classmethod
    def for_store(cls, store: Any) -> StoreDownstream:
        """Write through `feedback.store.ingest_batch` (decode, dedupe by event id, dead-letter bad bytes)."""
        from feedback.store import ingest_batch  # type: ignore[attr-defined]

        if inspect.iscoroutinefunction(ingest_batch):
            async def write(values: list[bytes]) -> None:
                await ingest_batch(store, values, source=None)
        else:
            def write(values: list[bytes]) -> None:  # type: ignore[misc]
                ingest_batch(store, values, source=None)
        return cls(write)

    async def send(self, records: Sequence[EventRecord]) -> None:
        values = [r.value for r in records]
        try:
            if self._is_async:
                await self._write(values)
            else:
                await asyncio.to_thread(self._write, values)
        except Exception as e:
            raise DownstreamUnavailable(f"store write failed: {e}") from e

    async def aclose(self) -> None:
        return None


def build_event_sink(
    settings: EventSettings,
    *,
    spool_dir: Path,
    bootstrap_servers: str = "",
    store: Any = None,
    registry: CollectorRegistry | None = None,
    retain_until_stored: bool = False,
) -> DurableEventSink:
    """The sink `settings` describe: Kafka (confluent or kafka-python) or, with broker mode `none`, the store."""
    sink = settings.sink
    spool = Spool(settings.sink.spool_dir or spool_dir, max_bytes=sink.spool_max_bytes,
                  segment_bytes=sink.spool_segment_bytes, fsync_interval_s=sink.fsync_interval_s,
                  write_ahead=sink.write_ahead, memory_max_records=sink.queue_max_events, registry=registry)
    downstream: Downstream
    if settings.broker.mode == "none":
        if store is None:
            raise ValueError("broker mode 'none' needs a store")
        downstream = StoreDownstream.for_store(store)
    else:
        from feedback.kafka import ConfluentDownstream, KafkaPythonDownstream

        servers = bootstrap_servers or settings.broker.bootstrap_servers
        kind = ConfluentDownstream if settings.broker.client == "confluent" else KafkaPythonDownstream
        downstream = kind(servers, compression=sink.compression)
    return DurableEventSink(spool, downstream, topic_prefix=settings.broker.topic_prefix, registry=registry,
                            retain_until_stored=retain_until_stored and settings.broker.mode != "none")
