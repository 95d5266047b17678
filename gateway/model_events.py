"""Where a gateway learns about model versions: the `models` topic, or any async source of the rows.

`KafkaModelEvents` reads the topic from its first record on in a consumer thread, with manual assignment and
no consumer group: every gateway replays the whole history and so rebuilds the current routing on start, and
no gateway's start or stop rebalances another.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from schemas.events import ModelEvent, decode_event

log = logging.getLogger(__name__)


class ModelEventSource(Protocol):
    """Every model lifecycle row the store holds (any order; the fold takes the latest per version)."""

    async def __call__(self) -> Sequence[ModelEvent]: ...


class KafkaModelEvents:
    """Reads one topic from its first record on, in a thread, and hands decoded `ModelEvent`s to `deliver`.

    `deliver(events, caught_up)` is called from the consumer thread; `caught_up` turns true once every
    partition was read to its end the first time (or the topic does not exist yet: nothing to replay).
    """

    def __init__(self, bootstrap_servers: str, topic: str,
                 deliver: Callable[[list[ModelEvent], bool], None], *, poll_s: float = 0.05):
        self._bootstrap = bootstrap_servers
        self._topic = topic
        self._deliver = deliver
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.assigned = False
        self.error = ""
        self.records = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-events", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _config(self) -> dict[str, Any]:
        from feedback.kafka import KafkaClientLog

        return {
            "bootstrap.servers": self._bootstrap,
            "group.id": f"servoloop-gateway-{uuid.uuid4().hex}",  # never joined or committed: assignment is manual
            "client.id": "servoloop-model-watcher",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,  # a promotion reaches every gateway within a poll, not half a second
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 1000,
            # connection churn while the broker is away goes to DEBUG (was an ERROR line every ~30 ms)
            "logger": KafkaClientLog("servoloop.kafka.models"),
        }

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

        consumer = Consumer(self._config())
        at_end: set[int] = set()
        partitions: list[int] = []
        caught_up = False
        try:
            while not self._stop.is_set():
                if not self.assigned:
                    try:
                        meta = consumer.list_topics(self._topic, timeout=2.0).topics.get(self._topic)
                    except Exception as e:  # the broker is away: keep trying, the gateway serves meanwhile
                        self.error = f"metadata: {e}"
                        self._stop.wait(0.5)
                        continue
                    if meta is None or meta.error is not None or not meta.partitions:
                        if not caught_up:  # no topic yet: there is no history to replay
                            caught_up = True
                            self._deliver([], True)
                        self._stop.wait(0.5)
                        continue
                    partitions = sorted(meta.partitions)
                    consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
                    self.assigned, self.error = True, ""
                batch: list[ModelEvent] = []
                for m in consumer.consume(1000, self._poll_s):
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            at_end.add(m.partition())
                        else:
                            self.error = err.str()
                            log.debug("model events: %s", err)
                        continue
                    self.records += 1
                    try:
                        event = decode_event(m.value() or b"")
                    except ValueError as e:
                        log.warning("model events: skipping an undecodable record at offset %d: %s", m.offset(), e)
                        continue
                    if isinstance(event, ModelEvent):
                        batch.append(event)
                now_caught_up = caught_up or at_end.issuperset(partitions)
                if batch or now_caught_up != caught_up:
                    caught_up = now_caught_up
                    self._deliver(batch, caught_up)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model events consumer stopped")
        finally:
            consumer.close()
