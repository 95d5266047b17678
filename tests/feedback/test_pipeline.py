"""The event pipeline of `servoloop up`: embedded broker, durable sink, ingester and store in one process.

The embedded broker runs on memory storage, so it loses what it holds when it dies; these tests show the
sink's spool covers that: every accepted event reaches the store exactly once (in effect) across a broker
kill, and `--no-broker` (mode `none`) writes through the spool straight to the store.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from feedback.broker import EmbeddedBroker
from feedback.kafka import ConfluentDownstream
from feedback.pipeline import EventPipeline
from feedback.settings import BrokerSettings, EventSettings, IngestSettings
from feedback.sink import DurableEventSink
from feedback.spool import Spool
from feedback.store import ChdbStore, count_rows, migrate
from schemas.events import InferenceEvent
from tests.support.clickhouse_http import shared_chdb_session


async def fresh_store() -> ChdbStore:
    store = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(store)
    return store


async def distinct_ids(store: ChdbStore, table: str) -> int:
    result = await store.query(f"SELECT uniqExact(event_id) AS n FROM {table}")
    return int(result.column("n")[0].as_py())


async def wait_until(cond, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_retaining_sink_keeps_delivered_events_until_confirmed_and_resends_on_request(
        broker: EmbeddedBroker, prefix: str, tmp_path: Path) -> None:
    broker.create_topics([prefix + "inferences"])
    sink = DurableEventSink(Spool(tmp_path / "spool"), ConfluentDownstream(broker.bootstrap_servers),
                            topic_prefix=prefix, retain_until_stored=True)
    await sink.start()
    events = [InferenceEvent(tenant="t", request_id=str(i)) for i in range(200)]
    for e in events:
        sink.publish(e)
    for _ in range(300):
        if sink.delivered == 200:
            break
        await asyncio.sleep(0.05)

    assert sink.delivered == 200 and sink.pending == 200 and sink.unconfirmed == 200  # sent, not yet stored
    sink.confirm(e.event_id for e in events[100:])  # later events stored first: nothing is released out of order
    assert sink.pending == 200 and sink.unconfirmed == 100
    sink.confirm(e.event_id for e in events[:100])
    assert sink.pending == 0 and sink.unconfirmed == 0

    more = [InferenceEvent(tenant="t", request_id=f"m{i}") for i in range(50)]
    for e in more:
        sink.publish(e)
    for _ in range(300):
        if sink.delivered == 250:
            break
        await asyncio.sleep(0.05)
    sink.redeliver()  # the broker lost them: they go out again
    for _ in range(300):
        if sink.delivered == 300:
            break
        await asyncio.sleep(0.05)
    assert sink.delivered == 300 and sink.redeliveries == 50
    sink.confirm(e.event_id for e in more)
    assert sink.pending == 0
    await sink.aclose()


def _settings(mode: str) -> EventSettings:
    return EventSettings(broker=BrokerSettings(mode=mode),  # type: ignore[arg-type]
                         ingest=IngestSettings(batch_max_wait_s=0.1))


async def test_embedded_pipeline_stores_every_event_once_across_a_broker_kill(tmp_path: Path) -> None:
    store = await fresh_store()
    pipeline = EventPipeline(_settings("embedded"), data_dir=tmp_path, store=store, watchdog_interval_s=0.2)
    await pipeline.start()
    assert pipeline.retains_until_stored
    sink, broker = pipeline.sink, pipeline.broker
    assert sink is not None and broker is not None
    n = 6000
    try:
        for i in range(n):
            sink.publish(InferenceEvent(tenant=f"t{i % 3}", request_id=str(i)))
            if i == n // 2:
                await asyncio.sleep(0.3)  # some of the first half reached the broker, maybe not the store
                broker.kill()  # memory storage: whatever the broker held is gone
            if i % 500 == 0:
                await asyncio.sleep(0.01)
        assert await pipeline.wait_stored(120), pipeline.health()
        assert pipeline.broker_restarts >= 1
        assert await count_rows(store, "inferences") == n
        assert await distinct_ids(store, "inferences") == n
        assert pipeline.health()["sink_pending"] == 0
    finally:
        await pipeline.aclose()
        await store.query(f"DROP DATABASE IF EXISTS {store.database}")


async def test_no_broker_mode_writes_through_the_spool_straight_to_the_store(tmp_path: Path) -> None:
    store = await fresh_store()
    pipeline = EventPipeline(_settings("none"), data_dir=tmp_path, store=store)
    await pipeline.start()
    try:
        assert pipeline.broker is None and pipeline.ingester is None
        assert pipeline.sink is not None
        for i in range(1000):
            pipeline.sink.publish(InferenceEvent(tenant="t", request_id=str(i)))
        assert await pipeline.wait_stored(60)
        assert await count_rows(store, "inferences") == 1000
        assert pipeline.health() == {"broker": "none", "sink": "ok", "sink_pending": 0}
    finally:
        await pipeline.aclose()
        await store.query(f"DROP DATABASE IF EXISTS {store.database}")


@pytest.mark.parametrize("mode", ["external"])
async def test_external_mode_without_bootstrap_servers_is_a_config_error(tmp_path: Path, mode: str) -> None:
    from schemas.errors import ConfigError

    store = await fresh_store()
    pipeline = EventPipeline(_settings(mode), data_dir=tmp_path, store=store)
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        await pipeline.start()


async def test_an_older_producers_events_and_a_newer_ones_are_ingested_side_by_side(tmp_path: Path) -> None:
    """Schema evolution end to end: records from an older producer (fewer fields) and a newer one (unknown
    fields) travel through the real broker and land as rows, the missing columns at their defaults."""
    import msgspec
    from confluent_kafka import Producer

    from feedback.store import get_inferences

    store = await fresh_store()
    pipeline = EventPipeline(_settings("embedded"), data_dir=tmp_path, store=store)
    await pipeline.start()
    try:
        old = msgspec.msgpack.encode({"type": "inference", "event_id": "old-1", "schema_version": 1,
                                      "ts_ms": 1_700_000_000_000, "tenant": "acme", "model": "m", "response": "hi"})
        new = msgspec.msgpack.encode({"type": "inference", "event_id": "new-1", "schema_version": 9,
                                      "ts_ms": 1_700_000_000_001, "tenant": "acme", "model": "m",
                                      "tokens_out": 3, "a_field_from_the_future": {"x": 1}})
        p = Producer({"bootstrap.servers": pipeline.bootstrap_servers})
        for value in (old, new):
            p.produce("servoloop.inferences", value, key=b"acme")
        assert p.flush(10) == 0

        async def both() -> bool:
            return await count_rows(store, "inferences") == 2
        await wait_until(both)
        rows = await get_inferences(store, tenant="acme", event_ids=["old-1", "new-1"])
        assert (rows["old-1"].schema_version, rows["old-1"].response, rows["old-1"].temperature) == (1, "hi", 1.0)
        assert (rows["new-1"].schema_version, rows["new-1"].tokens_out) == (9, 3)
        assert await count_rows(store, "dead_letters") == 0
    finally:
        await pipeline.aclose()
        await store.query(f"DROP DATABASE IF EXISTS {store.database}")
