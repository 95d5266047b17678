"""How fast the store side takes events: 100k realistic InferenceEvents through write_events and ingest_batch.

Marked slow; prints events/s. The floors are far under the measured figures (see the module's report
line) so a loaded CI machine does not flake, yet a regression by an order of magnitude fails.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from feedback.store import (
    ChdbStore,
    count_rows,
    ingest_batch,
    migrate,
    prepare_batch,
    write_events,
    write_prepared,
)
from schemas.events import InferenceEvent, Message, encode_event
from tests.support.clickhouse_http import shared_chdb_session

N = 100_000
BATCH = 20_000  # IngestSettings.batch_max_events


def realistic(i: int) -> InferenceEvent:
    """A chat request of a typical size: ~0.9 KB msgpack, two messages, a few hundred bytes of answer."""
    return InferenceEvent(
        tenant=f"tenant-{i % 5}", request_id=f"req-{i}", trace_id=f"{i:032x}", span_id=f"{i:016x}", key_id="k1",
        user=f"user-{i % 100}", model="tiny-chat", model_version="v3", adapter="lora-3", canary_arm="active",
        engine="vllm", messages=(Message(role="system", content="You are helpful."),
                                 Message(role="user", content=f"Tell me about item {i}. " * 5)),
        response="Here is a response about something interesting. " * 6, temperature=0.7, top_p=0.95,
        max_tokens=256, stop=("\n\n",), tokens_in=60, tokens_out=120, ttft_ms=23.5, latency_ms=410.2,
        finish_reason="stop", guardrail_types=("email",) if i % 10 == 0 else ())


@pytest.mark.slow
async def test_the_chdb_store_takes_100k_inference_events_well_above_the_pipeline_target() -> None:
    store = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(store)
    events = [realistic(i) for i in range(N)]
    values = [encode_event(e) for e in events]

    started = time.perf_counter()
    for i in range(0, N, BATCH):
        await write_events(store, events[i:i + BATCH])
    write_rate = N / (time.perf_counter() - started)

    batches = [values[i:i + BATCH] for i in range(0, N, BATCH)]
    started = time.perf_counter()
    for batch in batches:
        await ingest_batch(store, batch)  # the same ids again: decode + write, deduplicated
    ingest_rate = N / (time.perf_counter() - started)

    started = time.perf_counter()  # a consumer that prepares batch N+1 while batch N is inserted
    upcoming = asyncio.ensure_future(asyncio.to_thread(prepare_batch, batches[0]))
    for i in range(len(batches)):
        prepared = await upcoming
        if i + 1 < len(batches):
            upcoming = asyncio.ensure_future(asyncio.to_thread(prepare_batch, batches[i + 1]))
        await write_prepared(store, prepared)
    overlapped_rate = N / (time.perf_counter() - started)

    print(f"\nchDB store, {N} InferenceEvents in batches of {BATCH}: write_events {write_rate:,.0f} events/s, "
          f"ingest_batch (decode + write) {ingest_rate:,.0f} events/s, "
          f"prepare_batch overlapped with write_prepared {overlapped_rate:,.0f} events/s")
    assert await count_rows(store, "inferences") == N
    assert write_rate > 10_000 and ingest_rate > 8_000 and overlapped_rate > 8_000
    await store.query(f"DROP DATABASE {store.database}")
