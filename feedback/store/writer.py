"""Writing events: group by table, convert to Arrow off the event loop, insert; and the ingester's batch step.

Idempotence is the store's: every table is a ReplacingMergeTree whose key ends in `event_id`, so writing
the same events again (a redelivered Kafka batch, a retried insert) never changes a FINAL/argMax read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import msgspec
import pyarrow as pa

from feedback.store.base import Store
from feedback.store.columns import to_arrow
from schemas.errors import InvalidRequest
from schemas.events import DeadLetter, Event, MalformedEvent, decode_event

T = TypeVar("T")

# Below this many events, converting on the loop costs less than a hop to a worker thread.
_INLINE_MAX = 512

Tables = list[tuple[str, pa.Table]]


def _tables(events: Sequence[Event]) -> Tables:
    unique: dict[str, Event] = {e.event_id: e for e in events}  # in-batch repeats: one row each
    groups: dict[type[Event], list[Event]] = {}
    for e in unique.values():
        groups.setdefault(type(e), []).append(e)
    return [(cls.table, to_arrow(evs)) for cls, evs in groups.items()]


async def _off_loop(fn: Callable[[], T], size: int) -> T:
    return fn() if size <= _INLINE_MAX else await asyncio.to_thread(fn)


async def _insert_all(store: Store, tables: Tables) -> dict[str, int]:
    # One insert per table and batch: chDB pays ~20-70 ms per insert whatever its size, so no chunking.
    written: dict[str, int] = {}
    for table, data in tables:
        written[table] = written.get(table, 0) + await store.insert(table, data)
    return written


async def write_events(store: Store, events: Sequence[Event]) -> dict[str, int]:
    """Append `events` to their tables, one insert per table; return rows written per table.

    Safe to retry as a whole: on StoreError/StoreUnavailable some tables may already hold their rows,
    and writing them again changes no FINAL/argMax read. Events must be valid (decoded ones are).
    """
    if not events:
        return {}
    return await _insert_all(store, await _off_loop(partial(_tables, events), len(events)))


class IngestResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one batch became: rows per table (dead letters included) and the records that were refused."""

    received: int
    written: dict[str, int]
    dead_letters: tuple[DeadLetter, ...] = ()
    event_ids: tuple[str, ...] = ()  # the ids of the good events now stored

    @property
    def events(self) -> int:
        """Rows written outside the dead-letter table."""
        return sum(n for table, n in self.written.items() if table != DeadLetter.table)


def decode_batch(values: Sequence[bytes | None],
                 source: Sequence[tuple[str, int, int]] | None = None) -> tuple[list[Event], list[DeadLetter]]:
    """Decode raw record values: the events, and a DeadLetter (with its reason) for every bad one. Never raises."""
    good: list[Event] = []
    dead: list[DeadLetter] = []
    for i, raw in enumerate(values):
        try:
            if not raw:
                raise MalformedEvent("empty record", reason="undecodable")
            good.append(decode_event(raw))
        except MalformedEvent as e:
            where = source[i] if source is not None else None
            dead.append(DeadLetter.of(bytes(raw or b""), reason=e.reason, detail=e.message, source=where))
    return good, dead


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A decoded batch ready to insert: Arrow tables per event table, and the dead letters among them."""

    received: int
    tables: Tables
    dead_letters: tuple[DeadLetter, ...]
    event_ids: tuple[str, ...] = ()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch is converted (threads may nest this).

    A batch allocates several container objects per event and none of them form cycles; the collector's
    generation-0 passes over them cost ~15% of ingest CPU (measured: 54k -> 65k events per CPU-second).
    """
    global _paused
    with _pause_lock:
        if _paused == 0:
            was_enabled = gc.isenabled()
            gc.disable()
            _pause_state.append(was_enabled)
        _paused += 1
    try:
        yield
    finally:
        with _pause_lock:
            _paused -= 1
            if _paused == 0 and _pause_state.pop():
                gc.enable()


_pause_lock = threading.Lock()
_paused = 0
_pause_state: list[bool] = []


def prepare_batch(values: Sequence[bytes | None],
                  source: Sequence[tuple[str, int, int]] | None = None) -> PreparedBatch:
    """The CPU half of `ingest_batch` (decode, dedupe, convert): pure, never raises on bad bytes.

    A consumer may prepare batch N+1 on a worker thread while `write_prepared` stores batch N (the engine
    inserts without holding the GIL); whether that pays depends on free cores (measured in
    tests/feedback/test_store_throughput.py: no gain on a loaded 2-core machine).
    """
    if source is not None and len(source) != len(values):
        raise InvalidRequest(f"source has {len(source)} entries for {len(values)} values")
    with collector_paused():
        good, dead = decode_batch(values, source)
        return PreparedBatch(len(values), _tables([*good, *dead]) if good or dead else [], tuple(dead),
                             tuple(e.event_id for e in good))


async def write_prepared(store: Store, batch: PreparedBatch) -> IngestResult:
    """The I/O half of `ingest_batch`: one insert per table. Raises StoreError/StoreUnavailable; retry is safe."""
    written = await _insert_all(store, batch.tables)
    return IngestResult(received=batch.received, written=written, dead_letters=batch.dead_letters,
                        event_ids=batch.event_ids)


async def ingest_batch(store: Store, values: Sequence[bytes], *,
                       source: Sequence[tuple[str, int, int]] | None = None) -> IngestResult:
    """Decode a batch of Kafka record values and write it: good events to their tables, bad ones as dead letters.

    `source[i]` is (topic, partition, offset) of `values[i]`; with it, a redelivered bad record keeps
    its dead-letter id. Malformed bytes never raise; StoreError/StoreUnavailable do, and then nothing
    should be committed: calling again with the same batch is safe.
    """
    batch = await _off_loop(partial(prepare_batch, values, source), len(values))
    return await write_prepared(store, batch)
