"""The store, as a specification, against both real implementations.

Every test runs twice: on chDB directly (`ChdbStore`) and through clickhouse-connect over ClickHouse's
HTTP interface (`ClickHouseStore` against tests/support/clickhouse_http.py, the same engine behind
it). Each test gets a database of its own in the process's one chDB session.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

from feedback.store import (
    ChdbStore,
    ClickHouseStore,
    MigrationError,
    RatedInference,
    Store,
    StoreError,
    StoreUnavailable,
    applied_migrations,
    count_rows,
    dead_letters,
    feedback_with_inferences,
    get_inference,
    get_inferences,
    inferences_in_window,
    ingest_batch,
    migrate,
    version_stats,
    write_events,
)
from feedback.store.columns import columns_of, from_arrow
from schemas.events import (
    EVENT_TYPES,
    DeadLetter,
    Event,
    FeedbackEvent,
    GuardrailEvent,
    InferenceEvent,
    Message,
    ModelEvent,
    MonitorResult,
    RetrainTrigger,
    encode_event,
)
from schemas.migrations import Migration, load_migrations
from tests.support.clickhouse_http import shared_chdb_session, shared_endpoint

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
NASTY = "quote ' dq \" back\\slash tab\t nl\n nul\x00 ünïcödé 🙂 ${x} {y:String} %s"


@pytest.fixture(params=["chdb", "clickhouse"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated, empty database of its own, on the implementation named by the parameter."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    if request.param == "chdb":
        s: Store = ChdbStore(shared_chdb_session(), database)
    else:
        s = await ClickHouseStore.connect(shared_endpoint().url, database)
    await migrate(s)
    yield s
    await s.query(f"DROP DATABASE IF EXISTS {database}")
    await s.aclose()


def inference(tenant: str = "acme", *, ts_ms: int = T0, model: str = "m", version: str = "v1",
              **kw: object) -> InferenceEvent:
    return InferenceEvent(tenant=tenant, ts_ms=ts_ms, model=model, model_version=version, **kw)  # type: ignore[arg-type]


def thumbs(target: InferenceEvent, up: bool, *, ts_ms: int | None = None, **kw: object) -> FeedbackEvent:
    return FeedbackEvent(tenant=target.tenant, target_id=target.event_id, kind="thumbs", thumbs=up,
                         ts_ms=target.ts_ms + 1000 if ts_ms is None else ts_ms, **kw)  # type: ignore[arg-type]


def rich_events() -> list[Event]:
    """One event of every type with every field away from its default, awkward text included."""
    inf = inference(request_id="r-1", trace_id="a" * 32, span_id="b" * 16, key_id="k1", user="u-9",
                    adapter="lora-3", canary_arm="canary", engine="vllm", operation="text_completion",
                    prompt=NASTY, messages=(Message(role="system", content=NASTY), Message(role="user", content="")),
                    response=NASTY, temperature=0.25, top_p=0.5, max_tokens=77, seed=-(2**63), stop=("\n", NASTY),
                    tokens_in=2**32 - 1, tokens_out=5, ttft_ms=1.5, latency_ms=99.25, status="error",
                    error_code="engine_unavailable", finish_reason="length", cache_hit=True, stream=True,
                    input_action="redact", output_action="block", guardrail_types=("email", "aws_key"))
    return [
        inf,
        GuardrailEvent(tenant="acme", ts_ms=T0, request_id="r-1", inference_id=inf.event_id, key_id="k1", model="m",
                       side="output", action="redact", finding_counts={"email": 2, NASTY: 1},
                       detectors={"email": "regex", "aws_key": "secrets"}, elapsed_us=321, policy="strict",
                       streamed=True),
        FeedbackEvent(tenant="acme", ts_ms=T0 + 1, target_id=inf.event_id, kind="correction", metric_name="fix",
                      thumbs=False, rating=-1.5, comment=NASTY, correction=NASTY, preferred_id="p", other_id="o",
                      idempotency_key="idem", key_id="k1", user="u-9"),
        ModelEvent(ts_ms=T0, model="m", version_id="v2", base_model="tiny", adapter_path="/a/b", state="canary",
                   previous_state="candidate", reason=NASTY, actor="retrain", lineage='{"dataset": "s1"}'),
        MonitorResult(tenant="acme", ts_ms=T0, monitor="quality", metric="thumbs_up_rate", model="m",
                      model_version="v1", window_start_ms=T0 - MINUTE, window_end_ms=T0, value=0.5,
                      threshold=0.7, status="alert", sample_size=40, details='{"n": 40}'),
        RetrainTrigger(tenant="acme", ts_ms=T0, model="m", model_version="v1", method="sft", reason="drift",
                       monitor_event_id="mon-1", window_start_ms=T0 - MINUTE, window_end_ms=T0, actor="policy",
                       params='{"epochs": 1}'),
        DeadLetter.of(b"\x00\xff" + NASTY.encode(), reason="invalid", detail=NASTY, source=("topic", 2, 9)),
    ]


async def test_migrations_apply_once_and_a_second_run_changes_nothing(store: Store) -> None:
    assert await migrate(store) == []
    assert set(await applied_migrations(store)) == {m.version for m in load_migrations()}
    tables = await store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    assert {t.table for t in EVENT_TYPES} | {"_schema_migrations"} <= set(tables.column("name").to_pylist())


async def test_a_released_migration_edited_afterwards_is_refused(store: Store) -> None:
    first = load_migrations()[0]
    edited = Migration(first.version, first.name, first.statements, "0" * 64)
    with pytest.raises(MigrationError):
        await migrate(store, [edited])


async def test_a_new_migration_is_applied_after_the_released_ones(store: Store) -> None:
    extra = Migration(999, "add_note", ("ALTER TABLE feedback ADD COLUMN IF NOT EXISTS note String DEFAULT ''",),
                      "c" * 64)
    assert await migrate(store, [*load_migrations(), extra]) == [999]
    assert await migrate(store, [*load_migrations(), extra]) == []
    assert await count_rows(store, "feedback") == 0


async def test_every_table_has_exactly_one_column_per_event_field_plus_inserted_at(store: Store) -> None:
    for cls in EVENT_TYPES:
        described = await store.query(f"DESCRIBE TABLE {cls.table}")
        assert described.column("name").to_pylist() == [c.name for c in columns_of(cls)] + ["inserted_at"]


async def test_every_event_type_reads_back_field_for_field(store: Store) -> None:
    events = rich_events()
    written = await write_events(store, events)
    assert written == {type(e).table: 1 for e in events}
    for e in events:
        table = await store.query(f"SELECT * FROM {type(e).table} FINAL")
        assert from_arrow(type(e), table) == [e]


async def test_every_event_type_with_all_defaults_reads_back_unchanged(store: Store) -> None:
    events = [cls(ts_ms=T0) for cls in EVENT_TYPES if cls is not FeedbackEvent]
    events.append(FeedbackEvent(ts_ms=T0, target_id="x", kind="thumbs", thumbs=True))
    await write_events(store, events)
    for e in events:
        assert from_arrow(type(e), await store.query(f"SELECT * FROM {type(e).table} FINAL")) == [e]


async def test_rewriting_the_same_events_never_duplicates_them(store: Store) -> None:
    batch = [inference(ts_ms=T0 + i) for i in range(500)]
    fb = [thumbs(e, i % 2 == 0) for i, e in enumerate(batch[:100])]
    await write_events(store, [*batch, *fb])
    await write_events(store, [*batch, *fb])  # a redelivered batch
    await write_events(store, batch[:10] + batch[:10])  # repeats inside one batch
    assert await count_rows(store, "inferences") == 500
    assert await count_rows(store, "feedback") == 100
    got = await inferences_in_window(store, start_ms=T0, end_ms=T0 + 10_000)
    assert [e.event_id for e in got] == [e.event_id for e in batch]


async def test_counts_are_exact_per_tenant(store: Store) -> None:
    await write_events(store, [inference("a") for _ in range(7)] + [inference("b") for _ in range(3)])
    assert (await count_rows(store, "inferences", tenant="a"), await count_rows(store, "inferences", tenant="b")) == (7, 3)
    assert await count_rows(store, "inferences", tenant="nobody") == 0


async def test_windows_are_half_open_and_filter_by_tenant_model_and_version(store: Store) -> None:
    evs = [inference("a", ts_ms=T0 - 1), inference("a", ts_ms=T0), inference("a", ts_ms=T0 + MINUTE - 1),
           inference("a", ts_ms=T0 + MINUTE), inference("b", ts_ms=T0), inference("a", ts_ms=T0 + 5, version="v2"),
           inference("a", ts_ms=T0 + 6, model="other")]
    await write_events(store, evs)
    window = {"start_ms": T0, "end_ms": T0 + MINUTE}
    assert [e.event_id for e in await inferences_in_window(store, **window, tenant="a", model="m", model_version="v1")] \
        == [evs[1].event_id, evs[2].event_id]
    assert len(await inferences_in_window(store, **window)) == 5
    assert [e.event_id for e in await inferences_in_window(store, **window, limit=2)] == [evs[1].event_id, evs[4].event_id]


async def test_query_parameters_carry_any_text_safely(store: Store) -> None:
    e = inference(NASTY)
    await write_events(store, [e, inference("plain")])
    assert await count_rows(store, "inferences", tenant=NASTY) == 1
    assert await get_inference(store, tenant=NASTY, event_id=e.event_id) == e


async def test_an_inference_is_found_only_by_its_own_tenant(store: Store) -> None:
    mine, theirs = inference("acme"), inference("globex")
    await write_events(store, [mine, theirs])
    assert await get_inference(store, tenant="acme", event_id=mine.event_id) == mine
    assert await get_inference(store, tenant="acme", event_id=theirs.event_id) is None
    assert await get_inference(store, tenant="acme", event_id="no-such-id") is None
    assert await get_inferences(store, tenant="globex", event_ids=[mine.event_id, theirs.event_id]) == {
        theirs.event_id: theirs}


async def test_feedback_is_joined_to_its_own_tenants_inference_and_retries_count_once(store: Store) -> None:
    a1, a2 = inference("acme", ts_ms=T0), inference("acme", ts_ms=T0 + 1, version="v2")
    b1 = inference("globex", ts_ms=T0)
    f1 = thumbs(a1, True, ts_ms=T0 + 10, idempotency_key="k-1")
    f1_retry = thumbs(a1, True, ts_ms=T0 + 11, idempotency_key="k-1")  # same client request, sent twice
    f2 = FeedbackEvent(tenant="acme", ts_ms=T0 + 20, target_id=a2.event_id, kind="rating", rating=4.0)
    orphan = thumbs(inference("acme"), False, ts_ms=T0 + 30)  # its inference was never stored
    cross = FeedbackEvent(tenant="acme", ts_ms=T0 + 40, target_id=b1.event_id, kind="thumbs", thumbs=False)
    b_fb = thumbs(b1, False, ts_ms=T0 + 50)
    late = thumbs(a1, False, ts_ms=T0 + MINUTE)
    await write_events(store, [a1, a2, b1, f1, f1_retry, f2, orphan, cross, b_fb, late])
    window = {"start_ms": T0, "end_ms": T0 + MINUTE}

    assert await feedback_with_inferences(store, **window, tenant="acme") == [RatedInference(f1, a1),
                                                                             RatedInference(f2, a2)]
    assert await feedback_with_inferences(store, **window) == [RatedInference(f1, a1), RatedInference(f2, a2),
                                                              RatedInference(b_fb, b1)]
    assert await feedback_with_inferences(store, **window, kind="rating") == [RatedInference(f2, a2)]
    assert await feedback_with_inferences(store, **window, tenant="acme", model_version="v1") == [
        RatedInference(f1, a1)]


async def test_version_stats_aggregate_traffic_latency_tokens_and_the_latest_thumbs(store: Store) -> None:
    v1 = [inference(ts_ms=T0 + i, latency_ms=float(10 * (i + 1)), ttft_ms=2.0, tokens_in=10, tokens_out=i)
          for i in range(4)]
    v1.append(inference(ts_ms=T0 + 9, status="error", latency_ms=50.0, ttft_ms=2.0, tokens_in=10))
    v2 = [inference(ts_ms=T0 + 20 + i, version="v2", latency_ms=5.0, status="blocked" if i == 0 else "ok")
          for i in range(2)]
    other_tenant = inference("globex", ts_ms=T0)
    feedback = [
        thumbs(v1[0], False, ts_ms=T0 + 100), thumbs(v1[0], True, ts_ms=T0 + 200),  # changed their mind: up
        thumbs(v1[1], False, ts_ms=T0 + 100),
        thumbs(v1[2], True, ts_ms=T0 + 100),
        FeedbackEvent(tenant="acme", ts_ms=T0 + 100, target_id=v1[3].event_id, kind="rating", rating=2.0),
        FeedbackEvent(tenant="acme", ts_ms=T0 + 100, target_id=v1[2].event_id, kind="rating", rating=4.0),
        FeedbackEvent(tenant="acme", ts_ms=T0 + 100, target_id=v1[2].event_id, kind="comment", comment="nice"),
        thumbs(other_tenant, True),
    ]
    await write_events(store, [*v1, *v2, other_tenant, *feedback])
    stats = await version_stats(store, start_ms=T0, end_ms=T0 + MINUTE, tenant="acme")
    assert [(s.model, s.model_version) for s in stats] == [("m", "v1"), ("m", "v2")]
    s1, s2 = stats
    assert (s1.requests, s1.errors, s1.blocked, s1.tokens_in, s1.tokens_out) == (5, 1, 0, 50, 6)
    assert s1.mean_latency_ms == pytest.approx(30.0) and s1.mean_ttft_ms == pytest.approx(2.0)
    assert s1.p95_latency_ms == pytest.approx(50.0)
    assert (s1.thumbs_up, s1.thumbs_down, s1.thumbs_up_rate) == (2, 1, pytest.approx(2 / 3))
    assert (s1.ratings, s1.mean_rating) == (2, pytest.approx(3.0))
    assert (s2.requests, s2.blocked, s2.thumbs_up_rate, s2.mean_rating) == (2, 1, None, None)
    everyone = await version_stats(store, start_ms=T0, end_ms=T0 + MINUTE)
    assert [s.requests for s in everyone] == [6, 2]
    assert everyone[0].thumbs_up == 3


async def test_a_batch_of_raw_records_lands_in_its_tables_and_bad_records_become_dead_letters(store: Store) -> None:
    good = [inference(ts_ms=T0 + i) for i in range(20)]
    fb = thumbs(good[0], True)
    values = [encode_event(e) for e in good] + [encode_event(fb), b"\xc1junk",
                                                b'{"type": "inference"}', b"", encode_event(fb)[:-5]]
    source = [("servoloop.inferences", 0, i) for i in range(len(values))]
    result = await ingest_batch(store, values, source=source)
    assert result.received == 25 and result.events == 21
    assert result.written == {"inferences": 20, "feedback": 1, "dead_letters": 4}
    assert [d.offset for d in result.dead_letters] == [21, 22, 23, 24]
    assert {d.reason for d in result.dead_letters} == {"undecodable"}
    stored = await dead_letters(store)
    assert sorted(d.offset for d in stored) == [21, 22, 23, 24]
    assert {d.raw for d in stored} == {b"\xc1junk", b'{"type": "inference"}', b"", encode_event(fb)[:-5]}

    again = await ingest_batch(store, values, source=source)  # redelivered after a crash before commit
    assert again.written == result.written
    assert (await count_rows(store, "inferences"), await count_rows(store, "feedback"),
            await count_rows(store, "dead_letters")) == (20, 1, 4)


async def test_an_unknown_event_type_and_an_invalid_field_are_dead_lettered_with_their_reason(store: Store) -> None:
    values = [msgspec.msgpack.encode({"type": "from_the_future", "event_id": "x"}),
              msgspec.msgpack.encode({"type": "inference", "event_id": "y", "tokens_out": -3})]
    result = await ingest_batch(store, values)
    assert [d.reason for d in result.dead_letters] == ["unknown_type", "invalid"]
    assert result.events == 0 and await count_rows(store, "dead_letters") == 2


async def test_a_bad_statement_is_a_store_error_and_a_closed_store_is_unavailable(store: Store) -> None:
    with pytest.raises(StoreError) as e:
        await store.query("SELECT * FROM no_such_table")
    assert not isinstance(e.value, StoreUnavailable)
    with pytest.raises(StoreError):
        await store.query("SELEKT 1")


async def test_a_closed_store_refuses_work_as_unavailable() -> None:
    session_store = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await session_store.aclose()  # does not own the shared session: still usable
    assert (await session_store.query("SELECT 1 AS one")).column("one").to_pylist() == [1]
    http = await ClickHouseStore.connect(shared_endpoint().url, f"t_{uuid.uuid4().hex[:12]}")
    await http.aclose()
    with pytest.raises(StoreUnavailable):
        await http.query("SELECT 1")


async def test_an_unreachable_server_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await ClickHouseStore.connect("http://127.0.0.1:1", "x", connect_timeout=1)


def test_the_collector_pause_nests_across_threads_and_restores_the_state_it_found() -> None:
    """The ingester's consumer thread and the batch conversion pause the cyclic collector independently: it runs
    again only when the last pause ends, and a collector that was off before stays off."""
    import gc
    import threading

    from feedback.store.writer import collector_paused

    assert gc.isenabled()
    inner_entered, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        with collector_paused():
            inner_entered.set()
            release.wait(5)

    with collector_paused():
        t = threading.Thread(target=other_thread)
        t.start()
        assert inner_entered.wait(5)
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause still holds
    release.set()
    t.join(5)
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
