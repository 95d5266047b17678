"""Real infrastructure for the event pipeline: one tansu broker and one moto S3 server per test session."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from feedback.broker import EmbeddedBroker, LocalS3


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A memory-storage tansu broker shared by the session (tests isolate themselves by topic prefix)."""
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as b:
        yield b


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    with LocalS3(log_path=tmp_path_factory.mktemp("moto") / "moto.log") as s3:
        yield s3


@pytest.fixture
def s3_broker(local_s3: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A broker of its own (tests kill it) whose topics and offsets live in a fresh bucket."""
    b = EmbeddedBroker.on_s3(local_s3, f"b{uuid.uuid4().hex[:12]}", log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    b.start()
    yield b
    b.kill()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of its own for each test."""
    return f"t{uuid.uuid4().hex[:10]}."


@dataclass(frozen=True)
class Consumed:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: dict[str, bytes]


def read_topics(bootstrap: str, topics: list[str], *, expect: int, timeout_s: float = 30.0) -> list[Consumed]:
    """Every record of `topics` from the start (no consumer group), waiting until `expect` arrived."""
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    parts = [TopicPartition(t, p, 0) for t in topics for p in meta.topics[t].partitions]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "logger": logging.getLogger("tests.kafka")})
    consumer.assign(parts)
    out: list[Consumed] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in consumer.consume(10_000, 0.2):
                if m.error() is None:
                    out.append(Consumed(m.topic(), m.partition(), m.offset(), m.key() or b"", m.value() or b"",
                                        {k: v for k, v in (m.headers() or [])}))
    finally:
        consumer.close()
    return out


@pytest.fixture
def read() -> Callable[..., list[Consumed]]:
    return read_topics
