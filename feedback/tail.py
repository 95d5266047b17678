"""Reading event topics as they fill, for people: `servoloop events tail`.

`follow()` reads the topics without a consumer group (nothing committed, no rebalance) and yields every
record decoded, or with the reason it does not decode; `describe()` makes one line of it, `to_json()`
one JSON object. Bad bytes never raise here: they are shown as what they are.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from feedback.broker import BrokerError
from feedback.kafka import KafkaClientLog
from schemas.events import (
    DeadLetter,
    Event,
    FeedbackEvent,
    GuardrailEvent,
    InferenceEvent,
    MalformedEvent,
    ModelEvent,
    MonitorResult,
    RetrainTrigger,
    decode_event,
)

log = logging.getLogger(__name__)

_TEXT_MAX = 80


@dataclass(frozen=True, slots=True)
class TailedRecord:
    """One record of a topic: the event it holds, or the reason it holds none."""

    topic: str
    partition: int
    offset: int
    value: bytes
    event: Event | None = None
    error: MalformedEvent | None = None

    @property
    def type(self) -> str:
        """The event's type tag (`inference`, …), or `undecodable` for bytes that are no event."""
        return _tag(self.event) if self.event is not None else "undecodable"


def decode_record(topic: str, partition: int, offset: int, value: bytes | None) -> TailedRecord:
    """Decode one record's value; never raises."""
    raw = bytes(value or b"")
    try:
        if not raw:
            raise MalformedEvent("empty record", reason="undecodable")
        return TailedRecord(topic, partition, offset, raw, event=decode_event(raw))
    except MalformedEvent as e:
        return TailedRecord(topic, partition, offset, raw, error=e)


def _tag(event: Event) -> str:
    return str(type(event).__struct_config__.tag)


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _text(value: object) -> str:
    s = str(value)
    if len(s) > _TEXT_MAX:
        s = s[:_TEXT_MAX - 1] + "…"
    return json.dumps(s, ensure_ascii=False) if not s or any(c.isspace() or c in "\"'=" for c in s) else s


def _model(model: str, version: str) -> str:
    return f"{model}@{version}" if version else model


def _fields(e: Event) -> list[tuple[str, object]]:
    """The key fields of each event type, in reading order (empty values are left out by the caller)."""
    if isinstance(e, InferenceEvent):
        return [("model", _model(e.model, e.model_version)), ("adapter", e.adapter), ("arm", e.canary_arm),
                ("id", e.event_id), ("request", e.request_id), ("trace", e.trace_id), ("status", e.status),
                ("error", e.error_code), ("tokens", f"{e.tokens_in}/{e.tokens_out}"),
                ("ttft", f"{e.ttft_ms:.1f}ms" if e.ttft_ms else ""), ("latency", f"{e.latency_ms:.1f}ms"),
                ("cached", "yes" if e.cache_hit else ""), ("stream", "yes" if e.stream else ""),
                ("guard", f"{e.input_action}/{e.output_action}" if (e.input_action, e.output_action) != ("allow", "allow") else "")]
    if isinstance(e, GuardrailEvent):
        findings = ",".join(f"{k}:{v}" for k, v in sorted(e.finding_counts.items()))
        return [("model", e.model), ("id", e.event_id), ("request", e.request_id), ("inference", e.inference_id),
                ("side", e.side), ("action", e.action), ("findings", findings), ("policy", e.policy),
                ("elapsed", f"{e.elapsed_us}us")]
    if isinstance(e, FeedbackEvent):
        value = {"thumbs": "up" if e.thumbs else "down", "rating": e.rating, "comment": e.comment,
                 "correction": e.correction, "preference": f"{e.preferred_id}>{e.other_id}"}[e.kind]
        return [("id", e.event_id), ("target", e.target_id), ("metric", e.metric_name), ("kind", e.kind),
                ("value", value), ("idempotency", e.idempotency_key)]
    if isinstance(e, ModelEvent):
        state = f"{e.previous_state}->{e.state}" if e.previous_state else e.state
        return [("model", e.model), ("version", e.version_id), ("id", e.event_id), ("state", state),
                ("actor", e.actor), ("reason", e.reason)]
    if isinstance(e, MonitorResult):
        return [("model", _model(e.model, e.model_version)), ("id", e.event_id), ("monitor", e.monitor),
                ("metric", e.metric), ("value", f"{e.value:g}"), ("threshold", f"{e.threshold:g}"),
                ("status", e.status), ("n", e.sample_size)]
    if isinstance(e, RetrainTrigger):
        return [("model", _model(e.model, e.model_version)), ("id", e.event_id), ("method", e.method),
                ("reason", e.reason), ("monitor_event", e.monitor_event_id), ("actor", e.actor)]
    if isinstance(e, DeadLetter):
        return [("id", e.event_id), ("source", f"{e.source_topic}[{e.partition}]@{e.offset}"), ("reason", e.reason),
                ("detail", e.detail), ("bytes", len(e.raw))]
    return [("id", e.event_id)]


def describe(record: TailedRecord) -> str:
    """One line: time, type, tenant and the type's key fields; bad bytes say where they are and why."""
    e = record.event
    if e is None:
        assert record.error is not None
        return (f"UNDECODABLE {record.topic}[{record.partition}]@{record.offset} reason={record.error.reason} "
                f"detail={_text(record.error.message)} bytes={len(record.value)}")
    parts = [_time(e.ts_ms), f"{_tag(e):<11}", f"tenant={_text(e.tenant)}"]
    parts += [f"{k}={_text(v)}" for k, v in _fields(e) if v not in ("", None)]
    return " ".join(parts)


def to_json(record: TailedRecord) -> str:
    """The whole record as one JSON object: where it was read, and the full event (or the error and raw bytes)."""
    out: dict[str, object] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
    if record.event is not None:
        out["event"] = msgspec.to_builtins(record.event)
    else:
        assert record.error is not None
        out["error"] = {"reason": record.error.reason, "detail": record.error.message}
        out["raw_base64"] = base64.b64encode(record.value).decode()
    return json.dumps(out, ensure_ascii=False)


def follow(bootstrap_servers: str, topics: Sequence[str], *, from_beginning: bool = False,
           refresh_s: float = 5.0, poll_s: float = 0.5) -> Iterator[TailedRecord]:
    """Every new record of `topics` (from their start with `from_beginning`), forever; close the iterator to stop.

    Topics (or partitions) that appear later are picked up within `refresh_s`, from their start. Raises
    BrokerError when the broker cannot be reached at the start; later outages are ridden out.
    (tansu under-reports a partition's end, so without `from_beginning` a few older records may show.)
    """
    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": f"servoloop-tail-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "client.id": "servoloop-tail", "reconnect.backoff.max.ms": 1000,
                         "logger": KafkaClientLog("servoloop.kafka.tail")})
    try:
        try:
            assigned = _assign(consumer, topics, set(), OFFSET_BEGINNING if from_beginning else OFFSET_END)
        except KafkaException as e:
            raise BrokerError(f"cannot reach the broker at {bootstrap_servers}: {e.args[0].str()}") from e
        if not assigned:
            log.warning("none of %s exists yet; waiting for them", ", ".join(topics))
        next_refresh = time.monotonic() + refresh_s
        while True:
            if time.monotonic() >= next_refresh:
                try:
                    assigned = _assign(consumer, topics, assigned, OFFSET_BEGINNING)  # new ones: all of them
                except KafkaException as e:
                    log.debug("tail: metadata refresh failed: %s", e)
                next_refresh = time.monotonic() + refresh_s
            for m in consumer.consume(1000, poll_s):
                err = m.error()
                if err is None:
                    yield decode_record(m.topic(), m.partition(), m.offset(), m.value())
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.debug("tail: %s", err)
    finally:
        consumer.close()


def _assign(consumer: Consumer, topics: Sequence[str], assigned: set[tuple[str, int]],
            offset: int) -> set[tuple[str, int]]:
    meta = consumer.list_topics(timeout=10)
    present = {(t, p) for t in topics if t in meta.topics and meta.topics[t].error is None
               for p in meta.topics[t].partitions}
    new = present - assigned
    if new:
        consumer.incremental_assign([TopicPartition(t, p, offset) for t, p in sorted(new)])
    return assigned | new
