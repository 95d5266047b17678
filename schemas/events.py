"""Versioned event types: one definition each, msgpack-encoded on Kafka, one ClickHouse table each.

Every event is immutable, carries its own UUIDv7 `event_id` (time-ordered, the dedup key end to end)
and a `schema_version`. New fields get defaults, so an older producer's bytes still decode.
"""

from __future__ import annotations

import time
from typing import ClassVar

import msgspec
import uuid_utils


def new_event_id() -> str:
    """A UUIDv7 string: unique, and sortable by creation time."""
    return str(uuid_utils.uuid7())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    """Base of every event. Subclasses set `topic` (suffix after the configured prefix) and `table`."""

    topic: ClassVar[str]
    table: ClassVar[str]

    event_id: str = msgspec.field(default_factory=new_event_id)
    schema_version: int = 1
    ts_ms: int = msgspec.field(default_factory=now_ms)
    tenant: str = ""

    def partition_key(self) -> bytes:
        """Kafka key: events of one tenant stay ordered on one partition."""
        return self.tenant.encode()


# Concrete event types are declared below (InferenceEvent, GuardrailEvent, FeedbackEvent, ...) and
# listed in EVENT_TYPES; the codec decodes any of them from one tagged union.
EVENT_TYPES: tuple[type[Event], ...] = ()
