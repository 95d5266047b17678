"""The ingester's consumer loop: a consumer group reads the event topics in batches and commits only what is stored.

Each batch (up to `batch_max_events`, or what arrived within `batch_max_wait_s` of its first record; the next
batch is read while one is stored) goes to `handle(values, source)` — `feedback.store.ingest_batch` bound to a store, which decodes, writes idempotently by
event id and dead-letters bad records. Offsets are committed only after it returned; when it raises, the same
batch is retried with capped exponential backoff, never committed, never dropped. A store outage longer than
`max.poll.interval.ms` costs a rebalance and a redelivery (deduplicated by event id), not data.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from feedback.kafka import consumer_config
from feedback.settings import EventSettings, IngestSettings
from feedback.store.writer import collector_paused

if TYPE_CHECKING:
    from feedback.store import Store

log = logging.getLogger(__name__)

Source = tuple[str, int, int]  # topic, partition, offset
BatchHandler = Callable[[list[bytes], list[Source]], Awaitable[object]]
T = TypeVar("T")


def store_handler(store: Any) -> BatchHandler:
    """`feedback.store.ingest_batch` bound to `store` (run in a thread when it is synchronous)."""
    from feedback.store import ingest_batch  # type: ignore[attr-defined]

    if inspect.iscoroutinefunction(ingest_batch):
        async def handle(values: list[bytes], source: list[Source]) -> object:
            return await ingest_batch(store, values, source=source)
    else:
        async def handle(values: list[bytes], source: list[Source]) -> object:
            return await asyncio.to_thread(ingest_batch, store, values, source=source)
    return handle


class Ingester:
    """Consumes `topics` as group `settings.group_id` and hands batches to `handle`; `start()`, then `stop()`.

    All consumer calls run on one dedicated thread, so the event loop never blocks on Kafka.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Sequence[str],
        handle: BatchHandler,
        *,
        settings: IngestSettings | None = None,
        registry: CollectorRegistry | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        consumer_overrides: Mapping[str, Any] | None = None,
    ):
        self.settings = settings or IngestSettings()
        self._config = consumer_config(bootstrap_servers, self.settings.group_id, **(consumer_overrides or {}))
        self._topics = list(topics)
        self._handle = handle
        self._backoff_initial, self._backoff_max = backoff_initial_s, backoff_max_s
        self._executor: ThreadPoolExecutor | None = None
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._assigned: set[tuple[str, int]] = set()
        self._revocations = 0  # bumped by every revocation: a batch read across one is filtered
        self._watermarks: dict[tuple[str, int], tuple[int, int]] = {}  # written on the consumer thread only
        self._uncommitted: dict[tuple[str, int], int] = {}  # offsets stored but whose commit failed
        self.committed: dict[tuple[str, int], int] = {}  # next offset to read, per partition, as committed
        self.consumed = self.ingested = self.batches = self.failures = self.commit_failures = 0
        self._batch_seconds = None
        if registry is not None:
            self._batch_seconds = Histogram("servoloop_ingest_batch_seconds", "Time to store one batch (retries included)",
                                            registry=registry, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
            registry.register(_IngestCollector(self))

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kw))

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the consumer, subscribe, and run the loop in a task."""
        if self._task is not None:
            return
        self._stopping.clear()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-consumer")
        self._consumer = await self._call(Consumer, self._config)
        await self._call(self._consumer.subscribe, self._topics, on_assign=self._on_assign,
                         on_revoke=self._on_revoke, on_lost=self._on_revoke)
        self._task = asyncio.create_task(self._run(), name="ingester")

    async def stop(self) -> None:
        """Finish (or abandon, uncommitted) the batch at hand, leave the group, close. Idempotent."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await self._call(consumer.close)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def lag(self) -> dict[tuple[str, int], int]:
        """Records not yet committed, per assigned partition: the high watermark of the last fetch minus the
        committed offset (tansu under-reports ListOffsets, so the fetch's own watermark is used).

        Reads only what the consumer thread recorded: calling the consumer from here could wait on its lock
        while that thread sits in a commit to an unresponsive broker, and this runs on the event loop.
        """
        return {tp: max(0, high - max(low, self.committed.get(tp, 0)))
                for tp, (low, high) in list(self._watermarks.items()) if tp in self._assigned}

    def _record_watermarks(self) -> None:
        """On the consumer thread, after a fetch: the cached watermarks of every assigned partition."""
        consumer = self._consumer
        if consumer is None:
            return
        for topic, part in list(self._assigned):
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), cached=True)
            except (KafkaException, RuntimeError):  # closed meanwhile, or nothing fetched yet
                continue
            if high >= 0:
                self._watermarks[(topic, part)] = (low, high)

    # -- rebalance callbacks (on the consumer thread) --------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        try:  # where the group left off: lag is counted from there, not from offset 0
            for tp in consumer.committed(partitions, timeout=5):
                if tp.offset >= 0:
                    self.committed.setdefault((tp.topic, tp.partition), tp.offset)
        except KafkaException as e:
            log.debug("ingester: committed offsets unknown at assignment: %s", e)
        log.info("ingester assigned %s", sorted(self._assigned))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self._revocations += 1
        self._assigned -= gone
        for tp in gone:
            self._uncommitted.pop(tp, None)

    # -- the loop -------------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        # Pipelined: while one batch is stored and committed, the next one is consumed (the store works on its
        # own threads), so records never sit in the client's queue for a whole insert before their batch starts.
        # One batch is stored at a time and commits go in batch order; at most two batches are held.
        storing: asyncio.Task[bool] | None = None
        try:
            while not self._stopping.is_set():
                revocations = self._revocations
                try:
                    batch = await self._next_batch()
                except KafkaException as e:
                    log.warning("ingester: consume failed: %s", e)
                    await self._sleep(self._backoff_initial)
                    continue
                if self._revocations != revocations:  # records of partitions given away meanwhile are not ours
                    batch = [m for m in batch if (m.topic(), m.partition()) in self._assigned]
                if not batch:
                    continue
                # The consumer's position now is just past this batch: its offsets to commit once it is stored.
                positions = await self._positions()
                if storing is not None and not await storing:
                    return  # stopping: this batch stays uncommitted and is read again by whoever comes next
                storing = asyncio.create_task(self._store_and_commit([m.value() or b"" for m in batch],
                                                                     _Positions(batch), positions))
        finally:
            if storing is not None:
                await asyncio.gather(storing, return_exceptions=True)

    async def _store_and_commit(self, values: list[bytes], source: Sequence[Source],
                                positions: dict[tuple[str, int], int]) -> bool:
        if not await self._store(values, source):
            return False  # stopping: the batch stays uncommitted
        offsets: dict[tuple[str, int], int] = dict(self._uncommitted)
        for tp, offset in positions.items():
            offsets[tp] = max(offsets.get(tp, 0), offset)
        await self._commit(offsets)
        return True

    async def _next_batch(self) -> list[Message]:
        """Records up to batch_max_events, or what came within batch_max_wait_s of the first one."""
        assert self._consumer is not None
        limit, wait = self.settings.batch_max_events, self.settings.batch_max_wait_s
        out: list[Message] = []
        deadline: float | None = None
        while len(out) < limit and not self._stopping.is_set():
            timeout = 0.25 if deadline is None else deadline - time.monotonic()
            if timeout <= 0:
                break
            got = await self._call(self._consume, min(limit - len(out), 10_000), min(timeout, 0.25))
            for m in got:
                err = m.error()
                if err is None:
                    out.append(m)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.debug("ingester: %s", err)
            if out and deadline is None:
                deadline = time.monotonic() + wait
        self.consumed += len(out)
        return out

    def _consume(self, n: int, timeout: float) -> list[Message]:
        assert self._consumer is not None
        # confluent-kafka's Message objects are tracked by the cyclic collector and a batch keeps thousands of
        # them alive: allocating them with it running cost ~20% of the ingester's CPU in generation passes
        # (py-spy, benchmarks/ingest.py). They hold no cycles, so the collector sits out the call.
        with collector_paused():
            got = self._consumer.consume(n, timeout)
        self._record_watermarks()
        return got

    async def _positions(self) -> dict[tuple[str, int], int]:
        """Per assigned partition, the offset after the last record handed to us (one call, not one per record)."""
        assert self._consumer is not None
        parts = [TopicPartition(t, p) for t, p in self._assigned]
        got = await self._call(self._consumer.position, parts) if parts else []
        return {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0 and tp.error is None}

    async def _store(self, values: list[bytes], source: Sequence[Source]) -> bool:
        """Hand the batch over until it succeeds; False when stopping first."""
        backoff, started = self._backoff_initial, time.monotonic()
        while True:
            try:
                await self._handle(values, source)
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                log.warning("ingester: storing %d events failed (%s); retry in %.2fs", len(values), e, backoff)
                if await self._sleep(backoff):
                    return False
                backoff = min(backoff * 2, self._backoff_max)
        self.batches += 1
        self.ingested += len(values)
        if self._batch_seconds is not None:
            self._batch_seconds.observe(time.monotonic() - started)
        return True

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        assert self._consumer is not None
        owned = {tp: o for tp, o in offsets.items() if tp in self._assigned}
        if not owned:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in owned.items()]
        try:
            await self._call(self._consumer.commit, offsets=tps, asynchronous=False)
        except KafkaException as e:
            # Kept and merged into the next commit; if the partition moves elsewhere meanwhile, its new owner
            # re-reads from the last good commit (duplicates, deduplicated by event id; never a gap).
            self.commit_failures += 1
            self._uncommitted.update(owned)
            log.warning("ingester: commit failed (%s); retried with the next batch", e)
            return
        self._uncommitted = {tp: o for tp, o in self._uncommitted.items() if tp not in owned}
        self.committed.update(owned)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or return True as soon as stop() is called."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
            return True
        except TimeoutError:
            return False


class _Positions(Sequence[Source]):
    """(topic, partition, offset) of each record, computed only for the records asked about (dead letters)."""

    def __init__(self, batch: list[Message]):
        self._batch = batch

    def __len__(self) -> int:
        return len(self._batch)

    def __getitem__(self, i: int) -> Source:  # type: ignore[override]
        m = self._batch[i]
        return m.topic(), m.partition(), m.offset()


class _IngestCollector:
    def __init__(self, ingester: Ingester):
        self._i = ingester

    def collect(self) -> Iterator[Metric]:
        i = self._i
        yield CounterMetricFamily("servoloop_ingest_consumed_events", "Records read from Kafka", value=i.consumed)
        yield CounterMetricFamily("servoloop_ingest_ingested_events", "Records stored (then committed)", value=i.ingested)
        yield CounterMetricFamily("servoloop_ingest_batches", "Batches stored", value=i.batches)
        yield CounterMetricFamily("servoloop_ingest_batch_failures", "Failed attempts to store a batch", value=i.failures)
        yield CounterMetricFamily("servoloop_ingest_commit_failures", "Offset commits that failed", value=i.commit_failures)
        yield GaugeMetricFamily("servoloop_ingest_running", "1 while the consumer loop runs", value=float(i.running))
        lag = GaugeMetricFamily("servoloop_ingest_lag_events", "Records not yet committed, per partition",
                                labels=["topic", "partition"])
        for (topic, part), n in i.lag().items():
            lag.add_metric([topic, str(part)], n)
        yield lag
        committed = GaugeMetricFamily("servoloop_ingest_committed_offset", "Next offset to read, as committed",
                                      labels=["topic", "partition"])
        for (topic, part), o in i.committed.items():
            committed.add_metric([topic, str(part)], o)
        yield committed


# -- `servoloop ingest`: one ingester as a process of its own --------------------------------------------------------


async def run_ingester(
    settings: EventSettings,
    *,
    data_dir: Path,
    stop: asyncio.Event,
    registry: CollectorRegistry | None = None,
    progress_every_s: float = 5.0,
    backoff_max_s: float = 10.0,
    on_started: Callable[[Ingester], object] | None = None,
) -> Ingester:
    """Consume the external broker's event topics into the configured store until `stop` is set.

    The store (a chDB directory this process then owns, or a ClickHouse server) is opened and migrated
    first. Dead letters also go to the dead-letter topic, acknowledged before their batch is committed.
    Progress (events/s, lag, failures) is logged every `progress_every_s`. On `stop` the batch at hand
    is finished or abandoned uncommitted. Returns the stopped Ingester (its counters).

    Raises ConfigError when `broker.mode` is not `external` (or has no `bootstrap_servers`), and
    StoreUnavailable/StoreError/MigrationError when the store cannot be opened or migrated.
    """
    from feedback.store import migrate, open_store
    from schemas.errors import ConfigError
    from schemas.topics import all_topics, validate_prefix

    broker = settings.broker
    if broker.mode != "external":
        raise ConfigError(f"servoloop ingest consumes an external broker, but events.broker.mode is {broker.mode!r}; "
                          "set events.broker.mode: external and events.broker.bootstrap_servers "
                          "(the embedded broker's ingester runs inside `servoloop up`)")
    if not broker.bootstrap_servers:
        raise ConfigError("events.broker.bootstrap_servers is required when events.broker.mode is 'external'")
    topics = list(all_topics(validate_prefix(broker.topic_prefix)))
    store = await open_store(settings.store, data_dir=data_dir)
    try:
        applied = await migrate(store)
        log.info("ingest: store %s (database %s) ready%s", settings.store.kind, store.database,
                 f", applied migrations {applied}" if applied else "")
        await asyncio.to_thread(_report_missing_topics, broker.bootstrap_servers, topics)
        handle, close_handle = _dead_letter_forwarding_handler(store, settings)
        ingester = Ingester(broker.bootstrap_servers, topics, handle, settings=settings.ingest, registry=registry,
                            backoff_max_s=backoff_max_s)
        try:
            await ingester.start()
            log.info("ingest: group %s consuming %s from %s", settings.ingest.group_id, ", ".join(topics),
                     broker.bootstrap_servers)
            if on_started is not None:
                on_started(ingester)
            await _report_until(stop, ingester, progress_every_s)
        finally:
            await ingester.stop()
            await close_handle()
        log.info("ingest: stopped after %d events in %d batches (%d failed attempts)",
                 ingester.ingested, ingester.batches, ingester.failures)
        return ingester
    finally:
        await store.aclose()


def _dead_letter_forwarding_handler(store: Store, settings: EventSettings) -> tuple[BatchHandler, Callable[[], Awaitable[None]]]:
    """`ingest_batch` into `store`, then the batch's dead letters to the dead-letter topic (the batch fails, and is
    retried, until the broker acknowledged them); and the closer of its producer."""
    from feedback.kafka import ConfluentDownstream
    from feedback.sink import EventRecord
    from feedback.store import ingest_batch
    from schemas.events import encode_event
    from schemas.topics import dead_letter_topic

    dead_topic = dead_letter_topic(settings.broker.topic_prefix)
    downstream = ConfluentDownstream(settings.broker.bootstrap_servers, compression=settings.sink.compression)

    async def handle(values: list[bytes], source: list[Source]) -> object:
        result = await ingest_batch(store, values, source=source)
        dead = [d for d in result.dead_letters if d.source_topic != dead_topic]  # never re-forward our own
        if dead:
            await downstream.send([EventRecord(dead_topic, d.partition_key(), d.event_id, encode_event(d))
                                   for d in dead])
        return result

    return handle, downstream.aclose


def _report_missing_topics(bootstrap_servers: str, topics: list[str]) -> None:
    """Log what an operator should know before the first record: broker unreachable, topics not created yet."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "logger": logging.getLogger("servoloop.kafka.admin")})
    try:
        present = set(admin.list_topics(timeout=5).topics)
    except KafkaException as e:
        log.warning("ingest: broker %s not reachable yet (%s); waiting for it", bootstrap_servers, e.args[0])
        return
    missing = [t for t in topics if t not in present]
    if missing:
        log.warning("ingest: topics %s do not exist yet; they are consumed once created", ", ".join(missing))


async def _report_until(stop: asyncio.Event, ingester: Ingester, every_s: float) -> None:
    """Log events/s, lag and failures every `every_s` until `stop` is set (or the loop died)."""
    last_n, last_t = ingester.ingested, time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except TimeoutError:
            pass
        if not ingester.running:
            raise RuntimeError("the ingester loop ended unexpectedly")
        now, n = time.monotonic(), ingester.ingested
        log.info("ingest: %d events stored (%.0f/s), lag %d, %d batches, %d failed store attempts, "
                 "%d failed commits", n, (n - last_n) / (now - last_t), sum(ingester.lag().values()),
                 ingester.batches, ingester.failures, ingester.commit_failures)
        last_n, last_t = n, now
