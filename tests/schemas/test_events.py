"""The event codec: lossless, compact, tolerant of old and new producers, and never crashes on bad bytes."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.errors import InvalidRequest
from schemas.events import (
    EVENT_BY_TAG,
    EVENT_TYPES,
    AnyEvent,
    DeadLetter,
    Event,
    FeedbackEvent,
    GuardrailEvent,
    InferenceEvent,
    MalformedEvent,
    Message,
    decode_event,
    encode_event,
    event_to_json,
    new_event_id,
)
from tests.schemas.strategies import any_event

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(any_event())
def test_every_event_survives_encode_then_decode_unchanged(event: Event) -> None:
    decoded = decode_event(encode_event(event))
    assert type(decoded) is type(event)
    assert decoded == event


@FAST
@given(any_event())
def test_json_form_decodes_back_to_the_same_event(event: Event) -> None:
    assert msgspec.json.decode(event_to_json(event), type=AnyEvent) == event


@FAST
@given(any_event())
def test_every_record_names_its_type_id_time_and_schema_version(event: Event) -> None:
    raw = msgspec.msgpack.decode(encode_event(event))
    assert raw["type"] == type(event).__struct_config__.tag
    assert {"event_id", "ts_ms", "schema_version"} <= raw.keys()


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_to_an_event_or_raise_malformed_event_only(data: bytes) -> None:
    try:
        event = decode_event(data)
    except MalformedEvent as e:
        assert e.reason in {"undecodable", "unknown_type", "invalid"}
    else:
        assert isinstance(event, Event)


@FAST
@given(any_event(), st.data())
def test_damaged_records_never_raise_anything_but_malformed_event(event: Event, data: st.DataObject) -> None:
    raw = bytearray(encode_event(event))
    cut = data.draw(st.integers(0, len(raw) - 1))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4))
    for i, b in flips:
        raw[i] = b
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            decode_event(candidate)
        except MalformedEvent:
            pass


def test_event_ids_are_uuid7_strings_that_sort_by_creation_time() -> None:
    ids = [new_event_id() for _ in range(1000)]
    assert all(len(i) == 36 and i[14] == "7" for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_v1_record_without_the_newer_fields_decodes_with_their_defaults() -> None:
    # What an older producer wrote: only the fields it knew.
    v1 = msgspec.msgpack.encode({"type": "inference", "event_id": "e1", "schema_version": 1, "ts_ms": 1000,
                                 "tenant": "acme", "model": "m", "response": "hi"})
    event = decode_event(v1)
    assert isinstance(event, InferenceEvent)
    assert (event.event_id, event.tenant, event.response) == ("e1", "acme", "hi")
    assert event.guardrail_types == () and event.temperature == 1.0 and event.status == "ok"
    assert event.seed is None and event.schema_version == 1


def test_fields_from_a_newer_producer_are_ignored_by_this_decoder() -> None:
    newer = msgspec.msgpack.encode({"type": "guardrail", "event_id": "e2", "schema_version": 7, "ts_ms": 5,
                                    "side": "output", "action": "redact", "some_future_field": [1, 2, 3]})
    event = decode_event(newer)
    assert isinstance(event, GuardrailEvent)
    assert (event.schema_version, event.side, event.action) == (7, "output", "redact")


def test_records_are_compact_because_default_fields_are_not_encoded() -> None:
    bare = encode_event(InferenceEvent(tenant="acme"))
    assert len(bare) < 120
    assert set(msgspec.msgpack.decode(bare)) == {"type", "event_id", "schema_version", "ts_ms", "tenant"}


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),
    (b"garbage", "undecodable"),
    (msgspec.msgpack.encode([1, 2]), "undecodable"),
    (msgspec.msgpack.encode({"type": "no_such_event"}), "unknown_type"),
    (msgspec.msgpack.encode({"event_id": "x"}), "unknown_type"),
    (msgspec.msgpack.encode({"type": "inference", "tokens_in": -1}), "invalid"),
    (msgspec.msgpack.encode({"type": "inference", "status": "exploded"}), "invalid"),
    (msgspec.msgpack.encode({"type": "inference", "ts_ms": 2**62}), "invalid"),
    (msgspec.msgpack.encode({"type": "feedback", "target_id": "t", "kind": "thumbs"}), "invalid"),
])
def test_bad_records_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent) as e:
        decode_event(data)
    assert e.value.reason == reason
    assert isinstance(e.value, InvalidRequest)


@pytest.mark.parametrize(("kind", "values"), [
    ("thumbs", {}), ("rating", {}), ("comment", {"comment": ""}), ("correction", {}),
    ("preference", {"preferred_id": "a"}), ("preference", {"preferred_id": "a", "other_id": "b"}),
])
def test_feedback_without_the_value_its_kind_needs_is_refused(kind: str, values: dict) -> None:
    with pytest.raises(MalformedEvent):
        FeedbackEvent(target_id="t", kind=kind, **values)  # type: ignore[arg-type]


def test_feedback_metric_name_defaults_to_its_kind_and_survives_the_codec() -> None:
    fb = FeedbackEvent(target_id="a", kind="preference", preferred_id="a", other_id="b")
    assert fb.metric_name == "preference"
    assert decode_event(encode_event(fb)) == fb
    assert FeedbackEvent(target_id="a", kind="rating", rating=4.5, metric_name="helpfulness").metric_name == "helpfulness"


def test_a_dead_letter_keeps_the_raw_bytes_and_its_id_follows_the_source_position() -> None:
    a = DeadLetter.of(b"\x00\xffjunk", reason="undecodable", source=("servoloop.inferences", 3, 42))
    again = DeadLetter.of(b"\x00\xffjunk", reason="undecodable", source=("servoloop.inferences", 3, 42))
    elsewhere = DeadLetter.of(b"\x00\xffjunk", reason="undecodable", source=("servoloop.inferences", 3, 43))
    assert a.raw == b"\x00\xffjunk"
    assert a.event_id == again.event_id != elsewhere.event_id
    assert (a.source_topic, a.partition, a.offset) == ("servoloop.inferences", 3, 42)
    unknown = DeadLetter.of(b"abc", reason="invalid")
    assert unknown.event_id == DeadLetter.of(b"abc", reason="invalid").event_id
    assert (unknown.partition, unknown.offset) == (-1, -1)


def test_every_event_type_has_a_unique_tag_topic_and_table() -> None:
    assert len(EVENT_BY_TAG) == len(EVENT_TYPES)
    assert len({t.topic for t in EVENT_TYPES}) == len(EVENT_TYPES)
    assert len({t.table for t in EVENT_TYPES}) == len(EVENT_TYPES)


def test_events_are_immutable_and_partitioned_by_tenant() -> None:
    e = InferenceEvent(tenant="acme", messages=(Message(role="user", content="hi"),))
    with pytest.raises(AttributeError):
        e.tenant = "other"  # type: ignore[misc]
    assert e.partition_key() == b"acme"

