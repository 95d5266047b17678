"""Fault tests of the ingester with real parts: tansu (durable on S3 where it must survive), `servoloop ingest`
as a process, ClickHouse through clickhouse-connect over HTTP (the test endpoint in front of chDB).

The test reads the store directly (a `ChdbStore` on the same engine), so its own queries never go through
the faults it switches on in the endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from feedback.broker import EmbeddedBroker
from feedback.ingest import Ingester, run_ingester
from feedback.kafka import ConfluentDownstream, consumer_config
from feedback.pipeline import EventPipeline
from feedback.settings import BrokerSettings, EventSettings, IngestSettings, StoreSettings
from feedback.sink import DurableEventSink
from feedback.spool import Spool
from feedback.store import ChdbStore, count_rows, dead_letters
from schemas.events import DeadLetter, FeedbackEvent, InferenceEvent, decode_event, encode_event
from schemas.topics import all_topics, dead_letter_topic
from tests.feedback.conftest import read_topics
from tests.support.clickhouse_http import shared_chdb_session, shared_endpoint

pytestmark = pytest.mark.reliability

SERVOLOOP = str(Path(sys.executable).parent / "servoloop")
EVENT_TABLES = ("inferences", "feedback")


def unique_database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


async def publish_pairs(bootstrap: str, prefix: str, spool_dir: Path, n: int, start: int = 0) -> list[str]:
    """n inferences and a rating of each through a durable sink; returns their event ids once the broker has them."""
    sink = DurableEventSink(Spool(spool_dir), ConfluentDownstream(bootstrap), topic_prefix=prefix)
    await sink.start()
    ids = []
    for i in range(start, start + n):
        e = InferenceEvent(tenant=f"t{i % 7}", request_id=f"r{i}", model="tiny", model_version="v1",
                           tokens_in=i % 100, tokens_out=i % 50, latency_ms=float(i % 300), response="ok " * 10)
        f = FeedbackEvent(tenant=e.tenant, target_id=e.event_id, kind="rating", rating=float(i % 5))
        sink.publish(e)
        sink.publish(f)
        ids += [e.event_id, f.event_id]
    assert await sink.wait_delivered(120), f"{sink.pending} events not acknowledged by the broker"
    await sink.aclose()
    return ids


async def stored_ids(view: ChdbStore) -> list[str]:
    """Every event id in the event tables, as an exact read sees them (FINAL)."""
    out: list[str] = []
    for table in EVENT_TABLES:
        out += (await view.query(f"SELECT event_id FROM {table} FINAL")).column("event_id").to_pylist()
    return out


async def count(view: ChdbStore, table: str) -> int:
    try:
        return await count_rows(view, table)
    except Exception:  # not migrated yet
        return 0


async def stored(view: ChdbStore) -> int:
    """Events in the event tables, as an exact read counts them (FINAL)."""
    return sum([await count(view, t) for t in EVENT_TABLES])


async def wait_until(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not (await cond() if asyncio.iscoroutinefunction(cond) else cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(0.05)


async def wait_count(view: ChdbStore, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := await stored(view)) != n:
        assert got < n, f"{got} rows stored, more than the {n} events published"
        assert time.monotonic() < deadline, f"timed out: {got} of {n} events stored"
        await asyncio.sleep(0.1)


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    c = Consumer(consumer_config(bootstrap, group))
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return sum(max(tp.offset, 0) for tp in got)


class IngestProcess:
    """`servoloop ingest --config FILE` as a child process; every run appends to one log."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVOLOOP_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([SERVOLOOP, "ingest", "--config", str(self.config), "--progress-every", "1"],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         cwd=self.config.parent)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stopped_after(self) -> list[int]:
        """Events each clean run reported stored."""
        return [int(n) for n in re.findall(r"ingest: stopped after (\d+) events", self.text())]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


async def held(hold_event: threading.Event, proc: IngestProcess, timeout_s: float = 120) -> None:
    """Wait until the endpoint holds the insert (failing early if the ingester died instead)."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(hold_event.wait, 0.1):
        assert proc.proc is not None and proc.proc.poll() is None, f"ingester exited:\n{proc.text()[-3000:]}"
        assert time.monotonic() < deadline, f"no insert reached the endpoint:\n{proc.text()[-3000:]}"


async def test_an_ingester_killed_mid_batch_and_restarted_loses_nothing_and_duplicates_nothing(
    s3_broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    pairs = 10_000
    s3_broker.create_topics(all_topics(prefix), partitions=2)
    ids = await publish_pairs(s3_broker.bootstrap_servers, prefix, tmp_path / "spool", pairs)
    n = len(ids)
    database, group = unique_database(), f"g-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "servoloop.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "events": {
        "broker": {"mode": "external", "bootstrap_servers": s3_broker.bootstrap_servers, "topic_prefix": prefix},
        "store": {"kind": "clickhouse", "url": shared_endpoint().url, "database": database},
        "ingest": {"group_id": group, "batch_max_events": 1000, "batch_max_wait_s": 0.2}}}))
    endpoint, view = shared_endpoint(), ChdbStore(shared_chdb_session(), database)
    ingester = IngestProcess(config, tmp_path / "ingest.log")
    try:
        # Run 1: a few batches go in, then the ingester is SIGKILLed with its next insert in flight, which the
        # engine never runs. That batch must be read again from the last commit.
        with endpoint.hold_insert(database, tables=EVENT_TABLES, after=3) as hold:
            ingester.start()
            await held(hold.held, ingester)
            before = await stored(view)
            ingester.kill()
            hold.release(refuse=True)
        assert 0 < before < n

        # Run 2: the engine stores a batch, and the ingester dies before it hears so: stored, never committed.
        with endpoint.hold_insert(database, tables=EVENT_TABLES, after=3, executed=True) as hold:
            ingester.start()
            await held(hold.held, ingester)
            middle = await stored(view)
            ingester.kill()
        assert before < middle < n

        # Run 3: to the end, then SIGTERM: a clean stop.
        ingester.start()
        await wait_count(view, n, timeout_s=180)
        assert ingester.terminate() == 0, ingester.text()[-3000:]
    finally:
        ingester.close()

    assert sorted(await stored_ids(view)) == sorted(ids)  # each event exactly once in an exact read
    for table in EVENT_TABLES:
        distinct = await view.query(f"SELECT uniqExact(event_id) AS n FROM {table}")
        assert distinct.column("n")[0].as_py() == pairs
    # The batch stored in run 2 was delivered again in run 3 (more events written than were missing), and
    # the duplicates collapsed; the group committed everything.
    assert ingester.stopped_after()[-1] > n - middle
    for suffix in EVENT_TABLES:
        assert committed_total(s3_broker.bootstrap_servers, group, prefix + suffix, 2) == pairs
    await view.query(f"DROP DATABASE IF EXISTS {database}")


def sample(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


@pytest.mark.parametrize("mode", ["refuse", "drop"])
async def test_while_the_store_is_unavailable_the_ingester_retries_with_backoff_and_nothing_is_lost(
    mode: str, broker: EmbeddedBroker, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker.create_topics(all_topics(prefix), partitions=2)
    database, endpoint = unique_database(), shared_endpoint()
    view = ChdbStore(shared_chdb_session(), database)
    settings = EventSettings(
        broker=BrokerSettings(mode="external", bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix),
        store=StoreSettings(kind="clickhouse", url=endpoint.url, database=database),
        ingest=IngestSettings(group_id=f"g-{uuid.uuid4().hex[:8]}", batch_max_events=500, batch_max_wait_s=0.1))
    caplog.set_level(logging.WARNING, logger="feedback.ingest")
    registry, stop = CollectorRegistry(), asyncio.Event()
    running: list[Ingester] = []
    task = asyncio.create_task(run_ingester(settings, data_dir=tmp_path, stop=stop, registry=registry,
                                            progress_every_s=0.5, backoff_max_s=1.0, on_started=running.append))
    try:
        ids = await publish_pairs(broker.bootstrap_servers, prefix, tmp_path / "spool", 1000)
        await wait_count(view, len(ids), timeout_s=60)
        ingester = running[0]
        # A batch is committed just after it is stored: wait for the commits to catch up before the snapshot.
        await wait_until(lambda: sum(ingester.committed.values()) == len(ids), 30, "the stored events committed")
        committed = dict(ingester.committed)

        with endpoint.outage(mode, database=database) as outage:  # type: ignore[arg-type]
            for round_ in range(6):  # events keep coming meanwhile
                ids += await publish_pairs(broker.bootstrap_servers, prefix, tmp_path / "spool", 250,
                                           start=1000 + 250 * round_)
                await asyncio.sleep(0.5)
            await wait_until(lambda: sample(registry, "servoloop_ingest_batch_failures_total") >= 5, 30,
                             "five failed attempts")
            assert await stored(view) == 2000  # nothing got past the outage
            assert ingester.committed == committed  # and nothing was committed without being stored
            assert ingester.running
        await wait_count(view, len(ids), timeout_s=60)
        stop.set()
        done = await task
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    assert sorted(await stored_ids(view)) == sorted(ids)
    assert done.failures == sample(registry, "servoloop_ingest_batch_failures_total") >= 5
    # Capped exponential backoff between attempts (0.1 s doubling up to 1 s), and the attempts really waited
    # (the endpoint saw them spread over the announced delays; clickhouse-connect may add one quick retry each).
    delays = [float(d) for d in re.findall(r"retry in ([\d.]+)s", caplog.text)]
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.0] and max(delays) == 1.0, delays
    assert outage.times[-1] - outage.times[0] >= 0.9 * sum(delays[:-1]), (outage.times, delays)
    # Each attempt is at most two requests (the client retries a dropped connection once); one more attempt than
    # the failures logged may be in flight when the outage ends. Hammering would show many more.
    assert outage.hits <= 2 * (len(delays) + 1), [round(t - outage.times[0], 3) for t in outage.times]
    await view.query(f"DROP DATABASE IF EXISTS {database}")


def poison() -> list[tuple[bytes, str]]:
    """Records that are no event this version can store, each with the reason it must be refused for."""
    return [
        (b"\xc1\x00 definitely not msgpack", "undecodable"),
        # A producer of an incompatible schema version: retyped a field (tokens_in as text).
        (msgspec.msgpack.encode({"type": "inference", "event_id": str(uuid.uuid4()), "schema_version": 2,
                                 "ts_ms": 1_767_225_600_000, "tokens_in": "many"}), "invalid"),
        (msgspec.msgpack.encode({"type": "telepathy", "event_id": str(uuid.uuid4()), "schema_version": 1}),
         "unknown_type"),
    ]


def produce_between_good_events(bootstrap: str, topic: str, bad: list[bytes]) -> list[str]:
    """Good inference, bad record, good inference, … on one partition; returns the good events' ids."""
    p = Producer({"bootstrap.servers": bootstrap})
    good = [InferenceEvent(tenant="acme", request_id=f"r{i}") for i in range(len(bad) + 1)]
    for i, e in enumerate(good):
        p.produce(topic, encode_event(e), key=b"acme")
        if i < len(bad):
            p.produce(topic, bad[i], key=b"acme")
    assert p.flush(10) == 0
    return [e.event_id for e in good]


def dead_letters_on_topic(bootstrap: str, prefix: str, expect: int) -> list[DeadLetter]:
    records = read_topics(bootstrap, [dead_letter_topic(prefix)], expect=expect, timeout_s=30)
    letters = [decode_event(r.value) for r in records]
    assert all(isinstance(d, DeadLetter) for d in letters)
    return letters  # type: ignore[return-value]


async def test_poisoned_records_become_dead_letters_with_their_reason_and_the_ingester_keeps_going(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    broker.create_topics(all_topics(prefix), partitions=1)
    database = unique_database()
    view = ChdbStore(shared_chdb_session(), database)
    settings = EventSettings(
        broker=BrokerSettings(mode="external", bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix),
        store=StoreSettings(kind="clickhouse", url=shared_endpoint().url, database=database),
        ingest=IngestSettings(group_id=f"g-{uuid.uuid4().hex[:8]}", batch_max_wait_s=0.1))
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingester(settings, data_dir=tmp_path, stop=stop, progress_every_s=1))
    try:
        bad = poison()
        good = produce_between_good_events(broker.bootstrap_servers, prefix + "inferences", [b for b, _ in bad])
        deadline = time.monotonic() + 60
        while (await stored(view), await count(view, "dead_letters")) != (len(good), len(bad)):
            assert time.monotonic() < deadline, "dead letters or good events missing"
            await asyncio.sleep(0.1)
        later = produce_between_good_events(broker.bootstrap_servers, prefix + "inferences", [])
        await wait_count(view, len(good) + len(later), timeout_s=30)  # it keeps going
        on_topic = dead_letters_on_topic(broker.bootstrap_servers, prefix, expect=len(bad))
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
    assert task.result().failures == 0

    assert sorted(await stored_ids(view)) == sorted(good + later)
    in_table = sorted(await dead_letters(view), key=lambda d: d.offset)
    assert [(d.raw, d.reason) for d in in_table] == bad
    assert [d.offset for d in in_table] == [1, 3, 5]  # where each was read: good events on either side
    assert {d.source_topic for d in in_table} == {prefix + "inferences"} and all(d.detail for d in in_table)
    assert sorted((d.event_id, d.reason) for d in on_topic) == sorted((d.event_id, d.reason) for d in in_table)
    await view.query(f"DROP DATABASE IF EXISTS {database}")


async def test_in_the_embedded_pipeline_poisoned_records_land_in_the_dead_letter_table_and_topic(
    prefix: str, tmp_path: Path
) -> None:
    database = unique_database()
    store = ChdbStore(shared_chdb_session(), database)
    settings = EventSettings(broker=BrokerSettings(mode="embedded", topic_prefix=prefix),
                             ingest=IngestSettings(group_id=f"g-{uuid.uuid4().hex[:8]}", batch_max_wait_s=0.1))
    pipeline = EventPipeline(settings, data_dir=tmp_path, store=store)
    await pipeline.start()
    try:
        bad = poison()
        good = produce_between_good_events(pipeline.bootstrap_servers, prefix + "inferences", [b for b, _ in bad])
        deadline = time.monotonic() + 60
        while (await stored(store), await count(store, "dead_letters")) != (len(good), len(bad)):
            assert time.monotonic() < deadline, "dead letters or good events missing"
            await asyncio.sleep(0.1)
        on_topic = dead_letters_on_topic(pipeline.bootstrap_servers, prefix, expect=len(bad))
    finally:
        await pipeline.aclose()
    in_table = await dead_letters(store)
    assert sorted((d.raw, d.reason) for d in in_table) == sorted(bad)
    assert sorted((d.event_id, d.reason, d.raw_base64) for d in on_topic) == \
        sorted((d.event_id, d.reason, base64.b64encode(d.raw).decode()) for d in in_table)
    await store.query(f"DROP DATABASE IF EXISTS {database}")
