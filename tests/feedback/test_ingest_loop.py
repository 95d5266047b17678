"""The ingester's consumer loop against the real broker: batches, commit-after-store, retries, restarts.

Most tests use a recording stand-in for the store (`Recorder`) to observe batches and inject failures; the
last one runs the whole path into the real store (`feedback.store.ingest_batch` over chDB).
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from feedback.broker import EmbeddedBroker
from feedback.ingest import Ingester, Source, store_handler
from feedback.kafka import ConfluentDownstream, consumer_config
from feedback.settings import IngestSettings
from feedback.sink import DurableEventSink
from feedback.spool import Spool
from feedback.store import ChdbStore, count_rows, dead_letters, migrate
from schemas.events import FeedbackEvent, InferenceEvent, decode_event
from tests.support.clickhouse_http import shared_chdb_session


class Recorder:
    """Stands in for `ingest_batch`: records what it was given; fails the first `failures` calls."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.calls = 0
        self.batches: list[list[Source]] = []
        self.values: list[bytes] = []

    async def __call__(self, values: list[bytes], source: list[Source]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("store unavailable")
        self.batches.append(source)
        self.values.extend(values)

    @property
    def sources(self) -> list[Source]:
        return [s for b in self.batches for s in b]


def produce(broker: EmbeddedBroker, topic: str, n: int, start: int = 0) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5})
    for i in range(start, start + n):
        p.produce(topic, b"%d" % i, key=b"%d" % (i % 5))
    assert p.flush(10) == 0


def committed(broker: EmbeddedBroker, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer(consumer_config(broker.bootstrap_servers, group))
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in got}


async def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def ingester(broker: EmbeddedBroker, topics: list[str], handle: Recorder, group: str, **kw: object) -> Ingester:
    settings = IngestSettings(group_id=group, batch_max_events=kw.pop("batch_max_events", 20_000),  # type: ignore[arg-type]
                              batch_max_wait_s=0.1)
    return Ingester(broker.bootstrap_servers, topics, handle, settings=settings, backoff_initial_s=0.05,
                    backoff_max_s=0.2, **kw)  # type: ignore[arg-type]


async def test_every_event_from_the_sink_is_stored_once_and_its_offsets_committed_after(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    topics = [prefix + "inferences", prefix + "feedback"]
    broker.create_topics(topics, partitions=2)
    sink = DurableEventSink(Spool(tmp_path / "spool"), ConfluentDownstream(broker.bootstrap_servers), topic_prefix=prefix)
    await sink.start()
    ids = []
    for i in range(2000):
        e = InferenceEvent(tenant=f"t{i % 3}", request_id=str(i))
        f = FeedbackEvent(tenant=e.tenant, target_id=e.event_id, kind="thumbs", thumbs=i % 2 == 0)
        sink.publish(e)
        sink.publish(f)
        ids += [e.event_id, f.event_id]
    assert await sink.wait_delivered(30)
    await sink.aclose()

    registry = CollectorRegistry()
    store = Recorder()
    group = f"g-{uuid.uuid4().hex[:8]}"
    ing = ingester(broker, topics, store, group, registry=registry)
    await ing.start()
    await wait_until(lambda: len(store.values) >= 4000 and ing.lag() and not any(ing.lag().values()))
    assert all(registry.get_sample_value("servoloop_ingest_lag_events", {"topic": t, "partition": str(p)}) == 0
               for t, p in ing.lag())
    await ing.stop()
    assert sorted(decode_event(v).event_id for v in store.values) == sorted(ids)
    assert len(set(store.sources)) == 4000
    for topic in topics:
        ends: dict[int, int] = {}
        for t, part, offset in store.sources:
            if t == topic:
                ends[part] = max(ends.get(part, 0), offset + 1)
        assert {p: o for p, o in committed(broker, group, topic, 2).items() if o >= 0} == ends
    assert registry.get_sample_value("servoloop_ingest_ingested_events_total") == 4000
    assert registry.get_sample_value("servoloop_ingest_consumed_events_total") == 4000


async def test_batches_never_exceed_the_size_bound(broker: EmbeddedBroker, prefix: str) -> None:
    topic = prefix + "inferences"
    broker.create_topics([topic], partitions=1)
    produce(broker, topic, 1000)
    store = Recorder()
    ing = ingester(broker, [topic], store, f"g-{uuid.uuid4().hex[:8]}", batch_max_events=128)
    await ing.start()
    await wait_until(lambda: len(store.values) >= 1000)
    await ing.stop()
    assert max(len(b) for b in store.batches) <= 128
    assert store.values == [b"%d" % i for i in range(1000)]  # one partition: in order
    assert gc.isenabled()  # consuming pauses the cyclic collector only for the duration of each fetch


async def test_a_failing_store_is_retried_and_nothing_is_committed_until_it_succeeds(
    broker: EmbeddedBroker, prefix: str
) -> None:
    topic = prefix + "inferences"
    broker.create_topics([topic], partitions=1)
    produce(broker, topic, 500)
    store = Recorder(failures=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    ing = ingester(broker, [topic], store, group)
    await ing.start()
    await wait_until(lambda: store.calls >= 3)
    assert committed(broker, group, topic, 1)[0] < 0  # nothing committed while the store fails
    await wait_until(lambda: len(store.values) >= 500)
    await wait_until(lambda: ing.committed.get((topic, 0)) == 500)
    await ing.stop()
    assert ing.failures == 4
    assert store.values == [b"%d" % i for i in range(500)]
    assert committed(broker, group, topic, 1) == {0: 500}


async def test_a_restarted_group_resumes_after_its_last_commit_and_an_abandoned_batch_is_read_again(
    broker: EmbeddedBroker, prefix: str
) -> None:
    topic = prefix + "inferences"
    broker.create_topics([topic], partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    produce(broker, topic, 300)
    first = Recorder()
    ing = ingester(broker, [topic], first, group)
    await ing.start()
    await wait_until(lambda: ing.committed.get((topic, 0)) == 300)
    await ing.stop()

    produce(broker, topic, 200, start=300)
    down = Recorder(failures=10**9)  # the store is down: the batch is held, then abandoned at stop
    ing = ingester(broker, [topic], down, group)
    await ing.start()
    await wait_until(lambda: down.calls >= 2)
    await ing.stop()
    assert committed(broker, group, topic, 1) == {0: 300}

    second = Recorder()
    ing = ingester(broker, [topic], second, group)
    await ing.start()
    await wait_until(lambda: len(second.values) >= 200)
    await ing.stop()
    assert second.values == [b"%d" % i for i in range(300, 500)]
    assert first.values == [b"%d" % i for i in range(300)]


async def test_the_loop_rides_out_a_broker_kill_and_commits_after_the_restart(
    s3_broker: EmbeddedBroker, prefix: str
) -> None:
    topic = prefix + "inferences"
    s3_broker.create_topics([topic], partitions=1)
    produce(s3_broker, topic, 200)
    store = Recorder()
    group = f"g-{uuid.uuid4().hex[:8]}"
    ing = ingester(s3_broker, [topic], store, group)
    await ing.start()
    await wait_until(lambda: ing.committed.get((topic, 0)) == 200)
    s3_broker.kill()
    await asyncio.sleep(1.0)
    assert ing.running
    s3_broker.start()
    produce(s3_broker, topic, 200, start=200)
    await wait_until(lambda: ing.committed.get((topic, 0)) == 400, timeout_s=60)
    await ing.stop()
    assert sorted(set(store.values), key=int) == [b"%d" % i for i in range(400)]
    assert committed(s3_broker, group, topic, 1) == {0: 400}


async def test_through_sink_broker_and_ingester_every_event_lands_in_clickhouse_once_even_when_read_twice(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    store = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(store)
    topics = [prefix + "inferences", prefix + "feedback"]
    broker.create_topics(topics, partitions=2)
    sink = DurableEventSink(Spool(tmp_path / "spool"), ConfluentDownstream(broker.bootstrap_servers), topic_prefix=prefix)
    await sink.start()
    for i in range(1000):
        e = InferenceEvent(tenant=f"t{i % 3}", request_id=str(i))
        sink.publish(e)
        sink.publish(FeedbackEvent(tenant=e.tenant, target_id=e.event_id, kind="rating", rating=i % 5))
    assert await sink.wait_delivered(30)
    await sink.aclose()
    p = Producer({"bootstrap.servers": broker.bootstrap_servers})
    p.produce(topics[0], b"\xc1 not an event")
    assert p.flush(10) == 0

    for _ in range(2):  # a second group reads everything again: a redelivery as large as it gets
        ing = Ingester(broker.bootstrap_servers, topics, store_handler(store),
                       settings=IngestSettings(group_id=f"g-{uuid.uuid4().hex[:8]}", batch_max_wait_s=0.1))
        await ing.start()
        await wait_until(lambda ing=ing: sum(ing.committed.values()) == 2001)
        await ing.stop()
    assert await count_rows(store, "inferences") == 1000
    assert await count_rows(store, "feedback") == 1000
    assert [d.reason for d in await dead_letters(store)] == ["undecodable"]
    await store.query(f"DROP DATABASE IF EXISTS {store.database}")
