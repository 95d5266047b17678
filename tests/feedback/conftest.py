"""Real infrastructure for the feedback side: one tansu broker, one moto S3 server and one embedding model per test
session."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from feedback.broker import EmbeddedBroker, LocalS3
from feedback.monitors.embeddings import PromptEmbedder


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


class MemoEmbedder(PromptEmbedder):
    """The real model, remembering texts it has seen: tests reuse prompt and answer texts under new event ids."""

    def __init__(self) -> None:
        super().__init__()
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        new = sorted({t for t in texts if t not in self.memo})
        if new:
            self.memo.update(zip(new, super().embed(new), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else super().embed(texts)


@pytest.fixture(scope="session")
def embedder() -> PromptEmbedder:
    """One all-MiniLM-L6-v2 per test session (loading it costs seconds), shared by the grader and monitor tests."""
    e = MemoEmbedder()
    e.load()
    return e
