"""The gateway's event sink against the real tansu broker: delivery, order, outages, crashes, cost."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from feedback.broker import EmbeddedBroker, free_port
from feedback.kafka import ConfluentDownstream, KafkaPythonDownstream
from feedback.settings import BrokerSettings, EventSettings
from feedback.sink import (
    Downstream,
    DownstreamUnavailable,
    DurableEventSink,
    EventRecord,
    SinkHealth,
    StoreDownstream,
    build_event_sink,
)
from feedback.spool import Spool, SpoolHealth
from feedback.store import ChdbStore, count_rows, migrate
from schemas.events import InferenceEvent, decode_event, encode_event
from tests.feedback.conftest import Consumed
from tests.support.clickhouse_http import shared_chdb_session

REPO = Path(__file__).resolve().parents[2]
TOPIC = "inferences"


def event(i: int, tenants: int = 4) -> InferenceEvent:
    return InferenceEvent(tenant=f"tenant-{i % tenants}", request_id=str(i), model="tiny", response="ok " * 20)


def numbers(records: list[Consumed]) -> list[int]:
    return [int(decode_event(r.value).request_id) for r in records]  # type: ignore[attr-defined]


def assert_all_once_in_partition_order(records: list[Consumed], n: int) -> None:
    """Every event 0..n-1 arrived; per partition, first arrivals keep publish order (redeliveries may repeat)."""
    assert sorted(set(numbers(records))) == list(range(n))
    for partition in {r.partition for r in records}:
        seen: set[int] = set()
        firsts = []
        for r in sorted((r for r in records if r.partition == partition), key=lambda r: r.offset):
            k = numbers([r])[0]
            if k not in seen:
                seen.add(k)
                firsts.append(k)
        assert firsts == sorted(firsts), f"partition {partition} out of order"


def make_sink(tmp_path: Path, downstream: Downstream, prefix: str, *, memory_max_records: int = 100_000,
              max_bytes: int = 2**31, registry: CollectorRegistry | None = None, fsync_interval_s: float = 0.02,
              **kw: object) -> DurableEventSink:
    spool = Spool(tmp_path / "spool", fsync_interval_s=fsync_interval_s, memory_max_records=memory_max_records,
                  max_bytes=max_bytes, registry=registry)
    return DurableEventSink(spool, downstream, topic_prefix=prefix, backoff_max_s=0.5, registry=registry, **kw)  # type: ignore[arg-type]


async def test_published_events_arrive_once_each_in_per_partition_order(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path, read: Callable[..., list[Consumed]]
) -> None:
    broker.create_topics([prefix + TOPIC], partitions=3)
    registry = CollectorRegistry()
    sink = make_sink(tmp_path, ConfluentDownstream(broker.bootstrap_servers), prefix, registry=registry)
    await sink.start()
    for i in range(5000):
        sink.publish(event(i))
    assert await sink.wait_delivered(30)
    assert sink.health() == SinkHealth.OK
    await sink.aclose()
    records = read(broker.bootstrap_servers, [prefix + TOPIC], expect=5000)
    assert len(records) == 5000
    assert_all_once_in_partition_order(records, 5000)
    assert {r.headers["event_id"].decode() for r in records} == {decode_event(r.value).event_id for r in records}
    assert registry.get_sample_value("servoloop_sink_delivered_events_total") == 5000


async def test_with_a_healthy_broker_events_never_wait_on_the_disk(broker: EmbeddedBroker, prefix: str, tmp_path: Path) -> None:
    broker.create_topics([prefix + TOPIC], partitions=3)
    # Write-ahead puts each event in the page cache; only events unacknowledged for a whole group-commit
    # interval (here 0.2 s) are fsynced, and acknowledged segments are deleted before the kernel writes them back.
    sink = make_sink(tmp_path, ConfluentDownstream(broker.bootstrap_servers), prefix, fsync_interval_s=0.2)
    await sink.start()
    sink.publish(event(0))
    assert await sink.wait_delivered(10)  # connected
    fsyncs_before = sink._spool.fsyncs
    for i in range(1, 2001):
        sink.publish(event(i))
        if i % 20 == 0:
            await asyncio.sleep(0.002)  # a busy gateway: 10k events/s
    assert await sink.wait_delivered(10)
    await sink.aclose()
    assert sink._spool.fsyncs - fsyncs_before == 0 and sink._spool.written == 2001
    assert not list((tmp_path / "spool").glob("*.seg"))


async def test_the_kafka_python_producer_delivers_the_same_way(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path, read: Callable[..., list[Consumed]]
) -> None:
    broker.create_topics([prefix + TOPIC], partitions=2)
    sink = make_sink(tmp_path, KafkaPythonDownstream(broker.bootstrap_servers), prefix)
    await sink.start()
    for i in range(1000):
        sink.publish(event(i))
    assert await sink.wait_delivered(30)
    await sink.aclose()
    records = read(broker.bootstrap_servers, [prefix + TOPIC], expect=1000)
    assert_all_once_in_partition_order(records, 1000)


async def test_while_the_broker_is_down_publish_never_blocks_events_wait_in_the_spool_and_all_arrive_after_restart(
    s3_broker: EmbeddedBroker, prefix: str, tmp_path: Path, read: Callable[..., list[Consumed]]
) -> None:
    s3_broker.create_topics([prefix + TOPIC], partitions=3)
    # Deliveries time out (1 s) during the outage: the sink must retry them with a producer that is not fenced.
    downstream = ConfluentDownstream(s3_broker.bootstrap_servers, delivery_timeout_s=1)
    sink = make_sink(tmp_path, downstream, prefix, memory_max_records=500, stall_s=0.5)
    await sink.start()
    n, worst = 3000, 0.0
    for i in range(n):
        if i == 1000:
            s3_broker.kill()
        t = time.perf_counter()
        sink.publish(event(i))  # never raises: a failure here fails the test
        worst = max(worst, time.perf_counter() - t)
        if i % 100 == 99:
            await asyncio.sleep(0.01)  # the gateway's loop keeps serving
    for _ in range(200):
        if sink.send_failures >= 2:
            break
        await asyncio.sleep(0.05)
    assert sink.send_failures >= 2
    assert sink.health() == SinkHealth.DEGRADED
    assert sink._spool.health == SpoolHealth.SPILLING and sink._spool.written > 0
    assert sink.pending > 0
    s3_broker.start()
    assert await sink.wait_delivered(60), f"{sink.pending} events still pending"
    assert sink.health() == SinkHealth.OK
    await sink.aclose()
    assert worst < 0.05, f"publish() took {worst * 1e6:.0f} µs at worst"  # vs 1 s delivery timeouts: never waited
    records = read(s3_broker.bootstrap_servers, [prefix + TOPIC], expect=n)
    assert_all_once_in_partition_order(records, n)


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
async def test_a_producer_whose_deliveries_timed_out_in_an_outage_delivers_again_after_it(
    client: str, s3_broker: EmbeddedBroker, prefix: str
) -> None:
    s3_broker.create_topics([prefix + TOPIC], partitions=1)
    kind = ConfluentDownstream if client == "confluent" else KafkaPythonDownstream
    downstream = kind(s3_broker.bootstrap_servers, delivery_timeout_s=2)
    records = [EventRecord(prefix + TOPIC, b"k", str(i), b"%d" % i) for i in range(50)]
    await downstream.send(records)
    s3_broker.kill()
    with pytest.raises(DownstreamUnavailable):
        await downstream.send(records)
    s3_broker.start()
    await downstream.send(records)  # librdkafka bumped its idempotent epoch: tansu would fence that producer
    await downstream.aclose()


async def test_a_gateway_killed_with_sigkill_replays_its_spool_on_restart(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path, read: Callable[..., list[Consumed]]
) -> None:
    broker.create_topics([prefix + TOPIC], partitions=2)
    spool_dir = tmp_path / "spool"
    dead = f"127.0.0.1:{free_port()}"  # no broker there: the child can only spool
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.feedback.spool_child", str(spool_dir), dead, prefix,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    accepted = 0
    try:
        assert child.stdout is not None
        while accepted < 3000 and (line := await asyncio.wait_for(child.stdout.readline(), 30)):
            accepted = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # well inside the child's 0.5 s group commit
        await child.wait()
    assert accepted >= 3000, "the child never accepted 3000 events"

    sink = DurableEventSink(Spool(spool_dir), ConfluentDownstream(broker.bootstrap_servers), topic_prefix=prefix)
    await sink.start()
    assert await sink.wait_delivered(60)
    await sink.aclose()
    records = read(broker.bootstrap_servers, [prefix + TOPIC], expect=accepted, timeout_s=10)
    got = set(numbers(records))
    assert set(range(accepted)) <= got  # everything accepted before the kill (write-ahead), and nothing invented:
    assert got == set(range(max(got) + 1))


async def test_close_keeps_undelivered_events_in_the_spool_for_the_next_start(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path, read: Callable[..., list[Consumed]]
) -> None:
    broker.create_topics([prefix + TOPIC], partitions=1)
    down = ConfluentDownstream(f"127.0.0.1:{free_port()}", delivery_timeout_s=1)
    sink = make_sink(tmp_path, down, prefix, close_timeout_s=0.5)
    await sink.start()
    for i in range(200):
        sink.publish(event(i))
    await sink.aclose()
    sink = make_sink(tmp_path, ConfluentDownstream(broker.bootstrap_servers), prefix)
    assert sink.pending == 200
    await sink.start()
    assert await sink.wait_delivered(30)
    await sink.aclose()
    records = read(broker.bootstrap_servers, [prefix + TOPIC], expect=200)
    assert numbers(records)[:200] == list(range(200))


async def test_over_the_spool_cap_publish_refuses_loudly_and_never_raises(tmp_path: Path, prefix: str) -> None:
    registry = CollectorRegistry()
    down = ConfluentDownstream(f"127.0.0.1:{free_port()}", delivery_timeout_s=1)
    sink = make_sink(tmp_path, down, prefix, max_bytes=200_000, registry=registry, close_timeout_s=0.2)
    await sink.start()
    for i in range(2000):
        sink.publish(event(i))
    assert sink.health() == SinkHealth.FAILING
    refused = registry.get_sample_value("servoloop_sink_rejected_events_total", {"reason": "spool_full"})
    assert refused and refused + sink.published == 2000
    assert registry.get_sample_value("servoloop_sink_health", {"state": "failing"}) == 1
    await sink.aclose()
    sink.publish(event(0))  # after close: refused, counted, not raised
    assert sink.rejected["spool_closed"] == 1


async def test_without_a_broker_batches_go_through_the_spool_to_the_store_and_survive_its_outage(
    tmp_path: Path, prefix: str
) -> None:
    written: list[int] = []
    calls = 0

    def write(values: list[bytes]) -> None:  # stands in for feedback.store.ingest_batch until it lands
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError("store is down")
        written.extend(int(decode_event(v).request_id) for v in values)  # type: ignore[attr-defined]

    sink = make_sink(tmp_path, StoreDownstream(write), prefix)
    await sink.start()
    for i in range(3000):
        sink.publish(event(i))
    assert await sink.wait_delivered(30)
    await sink.aclose()
    assert written == list(range(3000))
    assert sink.send_failures == 2


async def test_built_from_settings_with_broker_mode_none_events_land_in_clickhouse(tmp_path: Path, prefix: str) -> None:
    store = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(store)
    settings = EventSettings(broker=BrokerSettings(mode="none", topic_prefix=prefix))
    sink = build_event_sink(settings, spool_dir=tmp_path / "spool", store=store)
    await sink.start()
    for i in range(1500):
        sink.publish(event(i))
    assert await sink.wait_delivered(30)
    await sink.aclose()
    assert await count_rows(store, "inferences") == 1500
    await store.query(f"DROP DATABASE IF EXISTS {store.database}")


async def test_built_from_settings_with_a_broker_events_reach_its_topics(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path, read: Callable[..., list[Consumed]]
) -> None:
    broker.create_topics([prefix + TOPIC])
    for client in ("confluent", "kafka-python"):
        settings = EventSettings(broker=BrokerSettings(mode="external", client=client, topic_prefix=prefix))
        sink = build_event_sink(settings, spool_dir=tmp_path / client, bootstrap_servers=broker.bootstrap_servers)
        await sink.start()
        sink.publish(event(0 if client == "confluent" else 1))
        assert await sink.wait_delivered(30)
        await sink.aclose()
    assert sorted(numbers(read(broker.bootstrap_servers, [prefix + TOPIC], expect=2))) == [0, 1]


async def test_publish_costs_a_few_microseconds(tmp_path: Path, prefix: str) -> None:
    class Blackhole:
        async def send(self, records: list[EventRecord]) -> None:
            return None

        async def aclose(self) -> None:
            return None

    sink = make_sink(tmp_path, Blackhole(), prefix)
    await sink.start()
    events = [event(i) for i in range(20_000)]
    costs = []
    for i, e in enumerate(events):
        t = time.perf_counter_ns()
        sink.publish(e)
        costs.append(time.perf_counter_ns() - t)
        if i % 500 == 499:
            await asyncio.sleep(0)
    await sink.aclose()
    costs.sort()
    p50, p99 = costs[len(costs) // 2] / 1000, costs[int(len(costs) * 0.99)] / 1000
    print(f"\npublish(): p50 {p50:.1f} µs, p99 {p99:.1f} µs per event (InferenceEvent, encoding included)")
    assert p50 <= 30


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
async def test_producer_throughput_to_tansu(client: str, broker: EmbeddedBroker, prefix: str) -> None:
    """The downstream alone: batches of 10k ready records, each batch confirmed (acks=all, idempotent, lz4)."""
    n = 100_000 if client == "confluent" else 20_000
    broker.create_topics([prefix + TOPIC], partitions=3)
    downstream = (ConfluentDownstream if client == "confluent" else KafkaPythonDownstream)(broker.bootstrap_servers)
    records = []
    for i in range(n):
        e = event(i)
        records.append(EventRecord(prefix + TOPIC, e.partition_key(), e.event_id, encode_event(e)))
    await downstream.send(records[:1])  # connected
    t = time.perf_counter()
    for k in range(1, n, 10_000):
        await downstream.send(records[k : k + 10_000])
    elapsed = time.perf_counter() - t
    await downstream.aclose()
    print(f"\n{client}: {(n - 1) / elapsed:,.0f} events/s confirmed ({len(records[0].value)}-byte events, 3 partitions)")
