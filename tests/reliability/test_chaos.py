"""The bounded form of benchmarks/chaos.py: mixed unary/streaming traffic with ratings at a rate two shared
cores sustain (5 req/s plus a rating each) for 60 s against a `servoloop serve` child (the tiny model on the
Transformers engine), while the broker is killed for 15 s, the ingester is SIGKILLed and restarted, and the store
refuses every query for 10 s. Nothing accepted is lost or doubled."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from benchmarks.chaos import ChaosPlan, run_chaos
from feedback.broker import EmbeddedBroker
from feedback.kafka import ConfluentDownstream
from feedback.sink import DurableEventSink
from feedback.spool import Spool
from schemas.events import FeedbackEvent
from tests.feedback.conftest import local_s3, s3_broker  # noqa: F401

pytestmark = pytest.mark.reliability

PLAN = ChaosPlan(duration_s=60, rate_per_s=5, broker_down_s=15, store_down_s=10, settle_timeout_s=120)


# This test once lost an acknowledged event in about one run of five (benchmarks/results/chaos_run1_open_loss.json):
# the idempotent producer's retry after a broker SIGKILL was answered DUPLICATE_SEQUENCE_NUMBER by tansu and counted
# as delivered, though the batch was never written. The producers are no longer idempotent (feedback/kafka.py); the
# test below reproduces that loss directly.
async def test_faults_under_load_lose_and_duplicate_nothing_and_fail_no_request(
        s3_broker: EmbeddedBroker, tiny_model_dir: Path, tmp_path: Path):  # noqa: F811
    fig = await run_chaos(PLAN, broker=s3_broker, model_dir=tiny_model_dir, work=tmp_path)
    report = json.dumps(fig.__dict__)
    print(report)
    assert len(fig.faults) == 6, fig.faults  # every fault was injected, and undone
    assert fig.requests_failed == 0, fig.failure_samples
    assert fig.requests_accepted >= 0.9 * PLAN.duration_s * PLAN.rate_per_s, report
    assert not fig.sink_rejected and fig.sink_pending_at_close == 0, report
    assert fig.ratings_failed == 0 and fig.ratings_accepted == fig.requests_accepted, report
    assert (fig.inference_rows_missing, fig.inference_rows_duplicated) == (0, 0), report
    assert (fig.feedback_rows_missing, fig.feedback_rows_duplicated) == (0, 0), report
    assert fig.gateway_rss_growth_pct < 10, report
    # 60 s never gets the ingester past warm-up: after the store outage it is still catching up (librdkafka fills
    # its bounded fetch queue). Here its RSS must stay bounded; the < 10 % growth is judged by the long form.
    assert fig.ingester_rss_mib_end < 512, report
    assert fig.gateway_rss_mib_end > 0 and fig.ingester_rss_mib_end > 0, report  # both were sampled


def read_ids(bootstrap: str, topic: str, partitions: int, want: set[str], timeout_s: float) -> set[str]:
    """Event ids (the record header) of `topic` from offset 0, until all of `want` were seen, nothing new came for
    15 s, or the time is up."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "logger": logging.getLogger("tests.kafka")})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen: set[str] = set()
    deadline = last_new = time.monotonic()
    deadline += timeout_s
    try:
        while not want <= seen and (now := time.monotonic()) < deadline and now - last_new < 15:
            for m in consumer.consume(10_000, 0.2):
                if m.error() is None:
                    seen.update(v.decode() for k, v in m.headers() or [] if k == "event_id")
                    last_new = time.monotonic()
    finally:
        consumer.close()
    return seen


KILLS = 12


async def test_events_the_broker_acknowledged_survive_broker_sigkills_mid_produce(
        s3_broker: EmbeddedBroker, tmp_path: Path):  # noqa: F811
    """The sink publishes continuously while tansu (on S3) is SIGKILLed and restarted twelve times: every event the
    sink saw acknowledged is in the topic afterwards. With an idempotent producer this lost tens of events per run
    (a retry answered DUPLICATE_SEQUENCE_NUMBER counts as delivered though tansu died before writing the batch)."""
    prefix = f"k{uuid.uuid4().hex[:8]}."
    topic = prefix + FeedbackEvent.topic
    s3_broker.create_topics([topic], partitions=2)
    sink = DurableEventSink(Spool(tmp_path / "spool"), ConfluentDownstream(s3_broker.bootstrap_servers,
                                                                           delivery_timeout_s=5),
                            topic_prefix=prefix, backoff_max_s=0.2)
    await sink.start()
    published: list[str] = []
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            for _ in range(25):
                e = FeedbackEvent(tenant=f"t{i % 5}", target_id=f"r{i}", kind="rating", rating=float(i % 5))
                sink.publish(e)
                published.append(e.event_id)
                i += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(publish())
    try:
        for _ in range(KILLS):
            await asyncio.sleep(0.8)
            await asyncio.to_thread(s3_broker.kill)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(s3_broker.start)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await task
    assert await sink.wait_delivered(90), f"{sink.pending} events not acknowledged"
    assert not sink.rejected and sink.send_failures >= 0
    await sink.aclose()
    want = set(published)
    seen = await asyncio.to_thread(read_ids, s3_broker.bootstrap_servers, topic, 2, want, 90)
    lost = want - seen
    assert not lost, f"{len(lost)} of {len(want)} acknowledged events are not in the topic"
