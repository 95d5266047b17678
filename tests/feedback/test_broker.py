"""The embedded tansu broker and its local S3 storage: start, restart on the same port, kill, persistence."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from feedback.broker import BrokerError, EmbeddedBroker, LocalS3, free_port, kafka_answers, tansu_binary
from feedback.kafka import consumer_config


def topics_of(broker: EmbeddedBroker) -> dict[str, int]:
    meta = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in meta.topics.items()}


def produce(broker: EmbeddedBroker, topic: str, values: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap_servers, "acks": "all", "enable.idempotence": True})
    for v in values:
        p.produce(topic, v)
    assert p.flush(10) == 0


def consumer(broker: EmbeddedBroker, group: str) -> Consumer:
    return Consumer(consumer_config(broker.bootstrap_servers, group))


def test_the_tansu_binary_ships_with_the_installed_package() -> None:
    assert tansu_binary().is_file()


def test_a_started_broker_answers_kafka_requests_and_creates_topics_idempotently(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        assert broker.running and kafka_answers(broker.port)
        broker.create_topics(["a", "b"], partitions=3)
        broker.create_topics(["a"], partitions=3)  # already there: fine
        assert topics_of(broker) == {"a": 3, "b": 3}
        assert "tansu" in (tmp_path / "tansu.log").read_text()
    assert not broker.running and not kafka_answers(broker.port)


def test_restart_keeps_the_port_and_a_memory_broker_gets_its_topics_back(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        broker.create_topics(["kept"], partitions=2)
        port = broker.port
        broker.restart(kill=True)
        assert broker.port == port and kafka_answers(port)
        assert topics_of(broker) == {"kept": 2}


def test_with_s3_storage_records_and_committed_offsets_survive_a_kill(local_s3: LocalS3, tmp_path: Path) -> None:
    broker = EmbeddedBroker.on_s3(local_s3, f"b{uuid.uuid4().hex[:12]}", log_path=tmp_path / "tansu.log")
    with broker:
        broker.create_topics(["durable"], partitions=1)
        produce(broker, "durable", [b"%d" % i for i in range(10)])
        c = consumer(broker, "g")
        c.assign([TopicPartition("durable", 0)])  # no group join: the committed offset is the group's all the same
        got = []
        while len(got) < 4:
            got += [m for m in c.consume(4 - len(got), 1.0) if m.error() is None]
        c.commit(offsets=[TopicPartition("durable", 0, got[-1].offset() + 1)], asynchronous=False)
        c.close()

        broker.restart(kill=True)

        c = consumer(broker, "g")
        c.assign([TopicPartition("durable", 0)])  # from the committed offset
        assert c.committed([TopicPartition("durable", 0)], timeout=10)[0].offset == 4
        rest = []
        while len(rest) < 6:
            rest += [m.value() for m in c.consume(10, 1.0) if m.error() is None]
        c.close()
        assert rest == [b"%d" % i for i in range(4, 10)]


def test_a_broker_that_cannot_start_raises_broker_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerError):
        EmbeddedBroker(storage="nowhere://at-all/", log_path=tmp_path / "tansu.log", start_timeout_s=5).start()


def test_nothing_listening_is_not_a_broker() -> None:
    assert not kafka_answers(free_port())


def test_a_bucket_can_be_created_twice(local_s3: LocalS3) -> None:
    name = f"b{uuid.uuid4().hex[:12]}"
    local_s3.create_bucket(name)
    local_s3.create_bucket(name)
