"""Kafka producers behind the sink's `Downstream` seam: confluent-kafka (default, librdkafka) and kafka-python.

Both produce with acks=all and retries, and a batch is confirmed only when every record of it was acknowledged by
the broker: delivery is at-least-once, and the store deduplicates by event id. The producers are deliberately NOT
idempotent: tansu (the embedded broker, 0.6.0) records an idempotent producer's sequence numbers in its metadata
object before it writes the record batch itself, so a broker killed between those two writes answers the client's
retry with DUPLICATE_SEQUENCE_NUMBER, which Kafka clients take as "already written" and report as delivered: the
batch is lost though acknowledged (measured: hundreds of records per twelve SIGKILLs; tests/reliability/test_chaos.py).
Without idempotence such a retry is simply written again (a duplicate, harmless). Also the consumer settings the
ingester uses (tuned so a group forms in seconds, not tens of seconds).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from feedback.sink import DownstreamUnavailable, EventRecord

log = logging.getLogger(__name__)


def producer_config(
    bootstrap_servers: str, *, compression: str = "lz4", linger_ms: int = 5, delivery_timeout_s: float = 30.0
) -> dict[str, Any]:
    """librdkafka producer settings: acks=all, retried, batched, compressed, quick to reconnect; not idempotent
    (a retry answered DUPLICATE_SEQUENCE_NUMBER would count as delivered; see the module docstring)."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "client.id": "servoloop-sink",
        "acks": "all",
        "enable.idempotence": False,
        "linger.ms": linger_ms,
        "compression.type": compression,
        "message.timeout.ms": int(delivery_timeout_s * 1000),
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 1000,
    }


def consumer_config(bootstrap_servers: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka consumer settings: manual commits, start at the earliest record, a group that forms fast."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "group.id": group_id,
        "client.id": "servoloop-ingester",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300_000,
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 1000,
        "logger": KafkaClientLog("servoloop.kafka.consumer"),
        **overrides,
    }


class KafkaClientLog:
    """librdkafka's log lines into Python logging; connection churn goes to DEBUG (the sink and the ingester
    report an outage once, with their health), everything else keeps its level."""

    _CHURN = frozenset({"FAIL", "BGQUEUE", "REQTMOUT", "DISCONNECT"})

    def __init__(self, name: str):
        self._log = logging.getLogger(name)

    def log(self, level: int, msg: str, *args: Any, **kw: Any) -> None:
        if args and args[0] in self._CHURN:
            level = logging.DEBUG
        self._log.log(level, msg, *args, **kw)


class _Errors:
    """The first delivery error of a batch (librdkafka reports only failures: delivery.report.only.error)."""

    __slots__ = ("first",)

    def __init__(self) -> None:
        self.first: KafkaError | None = None

    def on_delivery(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None and self.first is None:
            self.first = err


class ConfluentDownstream:
    """Produces with confluent-kafka; a batch is confirmed by flushing librdkafka's queue in a worker thread."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        compression: str = "lz4",
        linger_ms: int = 5,
        delivery_timeout_s: float = 30.0,
        config: Mapping[str, Any] | None = None,
    ):
        self._config = {
            **producer_config(bootstrap_servers, compression=compression, linger_ms=linger_ms,
                              delivery_timeout_s=delivery_timeout_s),
            # Python sees failures only; success is "librdkafka's queue is empty and nothing failed".
            "delivery.report.only.error": True,
            "logger": KafkaClientLog("servoloop.kafka.producer"),
            "error_cb": self._on_error,
            **(config or {}),
        }
        self._timeout = delivery_timeout_s
        self._producer: Producer | None = None
        self._fatal: KafkaError | None = None

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
            log.error("kafka producer: fatal error %s; it will be recreated", err)
        else:
            log.debug("kafka producer: %s", err)

    def _ensure(self) -> Producer:
        if self._fatal is not None and self._producer is not None:
            self._shutdown(flush_s=0)
        if self._producer is None:
            self._fatal = None
            self._producer = Producer(self._config)
        return self._producer

    async def send(self, records: Sequence[EventRecord]) -> None:
        """Produce every record; return when all are acknowledged. Raises DownstreamUnavailable."""
        if not records:
            return
        producer = self._ensure()
        errors = _Errors()
        produce, on_delivery = producer.produce, errors.on_delivery
        for r in records:
            while True:
                try:
                    produce(r.topic, r.value, r.key, on_delivery=on_delivery, headers=[("event_id", r.event_id)])
                    break
                except BufferError:  # librdkafka's queue is full: let the broker catch up
                    await asyncio.to_thread(producer.poll, 0.05)
                except KafkaException as e:
                    self._shutdown(flush_s=0)
                    raise DownstreamUnavailable(f"kafka produce failed: {e.args[0]}") from e
        # librdkafka fails every record by message.timeout.ms at the latest: the margin is a safety net.
        left = await asyncio.to_thread(producer.flush, self._timeout + 5)
        if left or errors.first is not None:
            # A fresh producer for the retry: nothing of the failed attempt lingers in librdkafka's queue (and
            # were idempotence switched on by `config`, a timed-out producer's bumped epoch would be fenced by tansu).
            self._shutdown(flush_s=0)
            reason = f"{left} records unconfirmed" if left else errors.first.str()  # type: ignore[union-attr]
            raise DownstreamUnavailable(f"kafka delivery failed: {reason}")

    def _shutdown(self, flush_s: float) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if flush_s > 0:
            producer.flush(flush_s)
        producer.purge()
        producer.flush(0)  # report purged records to their callbacks

    async def aclose(self) -> None:
        await asyncio.to_thread(self._shutdown, 0)  # unconfirmed records are still in the spool


class KafkaPythonDownstream:
    """Produces with kafka-python (pure Python, slower; `crc32c` installed makes it usable)."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        compression: str = "lz4",
        linger_ms: int = 5,
        delivery_timeout_s: float = 30.0,
        config: Mapping[str, Any] | None = None,
    ):
        self._config: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers.split(","),
            "client_id": "servoloop-sink",
            "acks": "all",
            "enable_idempotence": False,  # see the module docstring: at-least-once, deduplicated by event id
            "linger_ms": linger_ms,
            "compression_type": None if compression == "none" else compression,
            "delivery_timeout_ms": int(delivery_timeout_s * 1000),
            "request_timeout_ms": max(1000, int(delivery_timeout_s * 1000) // 2 - linger_ms),
            "max_block_ms": int(delivery_timeout_s * 1000),
            "reconnect_backoff_max_ms": 1000,
            **(config or {}),
        }
        self._timeout = delivery_timeout_s
        self._producer: Any = None
        self._lock = threading.Lock()

    def _send_blocking(self, records: Sequence[EventRecord]) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError as PyKafkaError

        with self._lock:
            try:
                if self._producer is None:
                    self._producer = KafkaProducer(**self._config)
                producer = self._producer
                futures = [producer.send(r.topic, value=r.value, key=r.key,
                                         headers=[("event_id", r.event_id.encode())]) for r in records]
                producer.flush(timeout=self._timeout)
                for f in futures:
                    f.get(timeout=0)
            except PyKafkaError as e:
                if self._producer is not None and not self._producer.bootstrap_connected():
                    self._close_blocking(0)
                raise DownstreamUnavailable(f"kafka-python produce failed: {e!r}") from e

    def _close_blocking(self, timeout_s: float) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.close(timeout=timeout_s)
            except Exception as e:  # closing a producer that lost its broker: nothing more to do
                log.debug("kafka-python producer close: %r", e)

    async def send(self, records: Sequence[EventRecord]) -> None:
        """Produce every record in a worker thread; return when all are acknowledged. Raises DownstreamUnavailable."""
        if records:
            await asyncio.to_thread(self._send_blocking, records)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close_blocking, 5.0)
