"""Event pipeline throughput and lag, and what event emission costs a request.

1. Sustained ingest: the pipeline exactly as `servoloop up` runs it (durable sink with its spool → embedded
   tansu broker → ingester → chDB in a temporary directory, all in this process) is offered InferenceEvents
   (realistic size: a short chat and answer; three per request in one `publish_many`, as the gateway publishes a
   request's events) at a fixed rate for `--duration` seconds. Every 250 ms the store is
   asked how many rows are visible; the publish time of the newest visible event gives the end-to-end lag at
   that moment. Reports the sustained rate at which events became visible and lag p50/p99/max, then checks
   with FINAL that every event arrived exactly once. The distributed run also reports the CPU each process
   spent per event (producer, broker, ingester): on a 2-core machine the three share the same cores.
2. Ingester capacity: the ingester alone (consumer group + chDB) draining a topic pre-filled with
   `--capacity-events` events, no producer competing: events/s and CPU per event, so the producer side is
   measured separately from the consumer side.
3. Request-path cost: the gateway's event observer (`gateway.events.EventEmitter` over the real durable sink)
   timed per request on realistic outcomes; and the same with no pipeline (the observer absent), so the
   difference is what emission adds to a request.

    .venv/bin/python benchmarks/ingest.py                   # 60 s at 55k events/s offered, both topologies
    .venv/bin/python benchmarks/ingest.py --quick           # 10 s smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import pct, process_cpu_s, write_result
from feedback.pipeline import EventPipeline
from feedback.settings import EventSettings, IngestSettings
from schemas.events import InferenceEvent, Message

# How long the ingester waits for a batch to fill: IngestSettings' default. Each chDB insert costs ~30-40 ms of CPU
# whatever its size (measured: 10 rows 27-41 ms, 12.5k rows 42-85 ms); since the ingester reads the next batch
# while one is stored, 0.3 s batches (~16k events at 55k/s) cost ~0.7 µs more CPU per event than 0.5 s ones and
# cut lag p99 from ~1.3 to ~0.9 s (40 s runs side by side, session 6).
BATCH_WAIT_S = IngestSettings().batch_max_wait_s

PROMPT = "What is the capital of France? Answer in one short sentence, please."
ANSWER = "Sure! The capital of France is Paris, a city on the Seine known for its museums."


def make_event(i: int, ts_ms: int) -> InferenceEvent:
    return InferenceEvent(
        ts_ms=ts_ms, tenant=f"tenant-{i % 8}", key_id="k" * 12, request_id="", model="tiny-chat", model_version="base",
        engine="vllm", messages=(Message("user", PROMPT),), response=ANSWER, max_tokens=64, tokens_in=19,
        tokens_out=21, ttft_ms=21.5, latency_ms=140.2, finish_reason="stop", user=f"user-{i % 1000}",
    )


EVENTS_PER_REQUEST = 3  # what a gateway publishes per request (the inference and its guardrail verdicts), in one call


async def _produce_at(publish_many, rate: float, stop: asyncio.Event, published: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Open-loop: publish `rate` events per second in 10 ms ticks until `stop`; counts into `published[0]`.

    Events go out as a gateway publishes them: one `publish_many` per request of EVENTS_PER_REQUEST events. A
    tick that is behind publishes what is due in slices of 500 events and yields between them, as a gateway's
    request handlers interleave with its other tasks: the sink's forwarder (and, embedded, the ingester) on the
    same event loop keep their turns instead of waiting for a whole backlog to be published.
    """
    t0 = time.monotonic()
    n = 0
    while not stop.is_set():
        due = int((time.monotonic() - t0) * rate)
        now_ms = int(time.time() * 1000)
        while n < due and not stop.is_set():
            for _ in range(min(500, due - n) // EVENTS_PER_REQUEST or 1):
                publish_many([make_event(n + i, now_ms) for i in range(EVENTS_PER_REQUEST)])
                n += EVENTS_PER_REQUEST
            published[0] = n
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)


async def produce_main(bootstrap: str, rate: float, duration: float, spool: Path) -> None:
    """The producer process of the distributed topology: a gateway's durable sink, publishing at `rate`."""
    from feedback.kafka import ConfluentDownstream
    from feedback.sink import DurableEventSink
    from feedback.spool import Spool

    sink = DurableEventSink(Spool(spool), ConfluentDownstream(bootstrap))
    await sink.start()
    stop, published = asyncio.Event(), [0]
    task = asyncio.create_task(_produce_at(sink.publish_many, rate, stop, published))
    await asyncio.sleep(duration)
    stop.set()
    await task
    await sink.wait_delivered(120)
    await sink.aclose()
    print(json.dumps({"published": published[0], "cpu_s": time.process_time()}), flush=True)


async def sustained_ingest(rate: float, duration: float, tmp: Path, *, topology: str) -> dict:
    """`distributed`: producer in its own process (a gateway), broker, ingester + chDB here (`servoloop ingest`).
    `embedded`: everything in this one process, as `servoloop up` runs it (the sink retains until stored)."""
    from feedback.broker import EmbeddedBroker

    ingest = IngestSettings(batch_max_events=50_000, batch_max_wait_s=BATCH_WAIT_S)
    broker = None
    producer = None
    if topology == "distributed":
        broker = EmbeddedBroker(log_path=tmp / "tansu.log")
        broker.start()
        settings = EventSettings(ingest=ingest, broker={"mode": "external",  # type: ignore[arg-type]
                                                        "bootstrap_servers": broker.bootstrap_servers})
        broker.create_topics([f"servoloop.{t}" for t in ("inferences", "guardrails", "feedback", "models", "monitors",
                                                           "retrain", "dead-letter")])
    else:
        settings = EventSettings(ingest=ingest)
    pipeline = EventPipeline(settings, data_dir=tmp)
    await pipeline.start()
    sink, store = pipeline.sink, pipeline.store
    assert sink is not None and store is not None
    await asyncio.sleep(4.0)  # the consumer group forms
    stop = asyncio.Event()
    published = [0]
    lags_s: list[float] = []
    visible_series: list[tuple[float, int]] = []

    async def observe() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.25)
            r = await store.query("SELECT count() AS n, toUnixTimestamp64Milli(max(ts)) AS newest FROM inferences")
            visible, newest_ms = int(r.column("n")[0].as_py()), r.column("newest")[0].as_py()
            visible_series.append((time.monotonic(), visible))
            if visible:
                lags_s.append(max(0.0, time.time() - int(newest_ms) / 1000))

    tasks = [asyncio.create_task(observe())]
    if topology == "distributed":
        producer = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--produce", pipeline.bootstrap_servers, "--rate", str(rate),
            "--duration", str(duration), "--spool", str(tmp / "producer-spool"), stdout=asyncio.subprocess.PIPE)
    else:
        tasks.append(asyncio.create_task(_produce_at(sink.publish_many, rate, stop, published)))
    started = time.monotonic()
    last_print = started
    cpu0, broker_cpu0 = time.process_time(), (process_cpu_s(broker.pid) if broker and broker.pid else 0.0)
    while time.monotonic() - started < duration:
        await asyncio.sleep(1.0)
        if time.monotonic() - last_print >= 10 and visible_series:
            last_print = time.monotonic()
            print(f"  {time.monotonic() - started:5.0f} s: visible {visible_series[-1][1]}, "
                  f"lag {lags_s[-1] if lags_s else float('nan'):.2f} s", flush=True)
    stop.set()
    producer_cpu_s = None
    if producer is not None:
        out, _ = await producer.communicate()
        report = json.loads(out.decode().strip().splitlines()[-1])
        published[0], producer_cpu_s = report["published"], report["cpu_s"]
    await asyncio.gather(*tasks)
    deadline = time.monotonic() + 120
    final = unique = 0
    while time.monotonic() < deadline:  # drain: everything published must become visible
        r = await store.query("SELECT count() AS n, uniqExact(event_id) AS u FROM inferences FINAL")
        final, unique = int(r.column("n")[0].as_py()), int(r.column("u")[0].as_py())
        if unique >= published[0]:
            break
        await asyncio.sleep(0.5)
    ingester_cpu_s = time.process_time() - cpu0
    broker_cpu_s = (process_cpu_s(broker.pid) if broker and broker.pid else 0.0) - broker_cpu0
    await pipeline.aclose()
    if broker is not None:
        broker.stop()
    # sustained rate: rows that became visible during the run (after its first second), per second
    window = [(t, v) for t, v in visible_series if t - started >= 1.0]
    visible_rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
    cpu: dict[str, float | None] = {"ingester": ingester_cpu_s, "producer": producer_cpu_s, "broker": broker_cpu_s}
    if topology == "embedded":  # one process: producer, sink and ingester together (its tansu child not counted)
        cpu = {"process": ingester_cpu_s}
    return {
        "topology": topology, "offered_events_per_s": rate, "duration_s": duration, "published_events": published[0],
        "visible_events_per_s": round(visible_rate, 1),
        "lag_p50_s": round(pct(lags_s, 50), 3), "lag_p99_s": round(pct(lags_s, 99), 3),
        "lag_max_s": round(max(lags_s), 3) if lags_s else None,
        "final_rows": final, "final_distinct_event_ids": unique,
        "lost_events": published[0] - unique, "duplicate_rows": final - unique,
        "cpu_us_per_event": {k: round(v / max(1, published[0]) * 1e6, 2) if v is not None else None
                             for k, v in cpu.items()},
    }


async def ingest_capacity(events: int, tmp: Path) -> dict:
    """The ingester alone: a real consumer group into chDB draining `events` pre-filled records (no producer
    running meanwhile), the pipeline's own batch step. Events/s from the first record read to the last stored."""
    from confluent_kafka import Producer

    from feedback.broker import EmbeddedBroker
    from feedback.ingest import Ingester
    from feedback.kafka import producer_config
    from feedback.store import ChdbStore, ingest_batch, migrate
    from schemas.events import encode_event

    topic = "servoloop.inferences"
    with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
        broker.create_topics([topic])
        producer = Producer(producer_config(broker.bootstrap_servers))
        now_ms = int(time.time() * 1000)
        for i in range(events):
            while True:
                try:
                    producer.produce(topic, encode_event(make_event(i, now_ms)), f"tenant-{i % 8}".encode())
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(120)
        del producer  # closed now, not when the broker is already gone (librdkafka would log the disconnect)
        store = ChdbStore.open(tmp / "chdb")
        await migrate(store)

        async def handle(values: list[bytes], source: list) -> object:  # type: ignore[type-arg]
            return await ingest_batch(store, values, source=source)

        ingester = Ingester(broker.bootstrap_servers, [topic], handle,
                            settings=IngestSettings(batch_max_events=50_000, batch_max_wait_s=BATCH_WAIT_S))
        await ingester.start()
        started = cpu0 = None
        while ingester.ingested < events:
            await asyncio.sleep(0.01)
            if started is None and ingester.consumed:
                started, cpu0 = time.monotonic(), time.process_time()
        assert started is not None and cpu0 is not None
        wall, cpu = time.monotonic() - started, time.process_time() - cpu0
        await ingester.stop()
        r = await store.query("SELECT count() AS n, uniqExact(event_id) AS u FROM inferences FINAL")
        await store.aclose()
    return {"events": events, "events_per_s": round(events / wall, 1), "cpu_us_per_event": round(cpu / events * 1e6, 2),
            "batches": ingester.batches, "final_rows": int(r.column("n")[0].as_py()),
            "final_distinct_event_ids": int(r.column("u")[0].as_py())}


def _outcomes(count: int) -> list:  # type: ignore[type-arg]
    """Realistic finished requests: a short chat, its answer, guardrail verdicts on both sides."""
    from gateway.auth import KeyLimits, Principal
    from gateway.guarding import GuardState
    from gateway.request import ChatMessage, InferenceRequest, SamplingParams, Usage
    from gateway.router import ModelRoute, Served
    from gateway.service import Admission, Outcome
    from guardrails import GuardrailVerdict

    principal = Principal("k" * 12, "tenant-1", frozenset({"infer"}), KeyLimits(0, 0, 0), False)
    out = []
    for i in range(count):
        req = InferenceRequest(model="tiny-chat", operation="chat", params=SamplingParams(max_tokens=64),
                               messages=(ChatMessage("user", PROMPT),), request_id=f"{i:032x}",
                               trace_id="ab" * 16, span_id="cd" * 8)
        adm = Admission(principal, req, ModelRoute("tiny-chat", None), "http", 19, 83, None, None)  # type: ignore[arg-type]
        adm.served.append(Served("tiny-chat", "vllm", "base", None))
        verdict = {"finding_counts": {}, "detectors": {"pii": "1", "injection": "1"}}
        adm.guard = GuardState(None, GuardrailVerdict(side="input", action="allow", elapsed_us=40, **verdict),  # type: ignore[arg-type]
                               GuardrailVerdict(side="output", action="allow", elapsed_us=30, **verdict))
        out.append(Outcome(adm, ANSWER, "stop", Usage(19, 21), "ok", "", 0.02, 0.14))
    return out


def request_path_cost(tmp: Path, n: int = 100_000) -> dict:
    """What event emission costs a request: the observer's own time on the request path (build the three events
    and enqueue them on the real durable sink), timed per call; and this process's CPU per request including the
    background shipping to a real broker, against the same loop without the observer."""
    from feedback.broker import EmbeddedBroker
    from feedback.kafka import ConfluentDownstream
    from feedback.sink import DurableEventSink
    from feedback.spool import Spool
    from gateway.events import EventEmitter

    outcomes = _outcomes(1000)

    async def loop(emit) -> tuple[list[int], float]:  # type: ignore[no-untyped-def]
        samples: list[int] = []
        clock = time.perf_counter_ns
        cpu0 = time.process_time()
        for i in range(n):
            o = outcomes[i % 1000]
            t = clock()
            emit(o)
            samples.append(clock() - t)
            if i % 4 == 0:
                await asyncio.sleep(0)  # requests interleave with the sink's forwarder, as in a gateway
        return samples, time.process_time() - cpu0

    async def run() -> dict:
        with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
            broker.create_topics(["servoloop.inferences", "servoloop.guardrails"])
            sink = DurableEventSink(Spool(tmp / "spool"), ConfluentDownstream(broker.bootstrap_servers))
            await sink.start()
            emitter = EventEmitter(sink)
            await loop(emitter)  # warm up
            await sink.wait_delivered(60)
            with_samples, _ = await loop(emitter)
            cpu0 = time.process_time()
            await sink.wait_delivered(120)
            with_cpu = _ + time.process_time() - cpu0
            without_samples, without_cpu = await loop(lambda o: None)
            await sink.aclose()
        w, wo = with_samples, without_samples
        return {
            "events_per_request": 3,
            "request_path_us_p50": round(pct(w, 50) / 1000, 2), "request_path_us_p99": round(pct(w, 99) / 1000, 2),
            "request_path_us_mean": round(statistics.fmean(w) / 1000, 2),
            "without_events_us_p50": round(pct(wo, 50) / 1000, 2),
            "added_us_per_request": round((pct(w, 50) - pct(wo, 50)) / 1000, 2),
            "process_cpu_us_per_request_with_shipping": round(with_cpu / n * 1e6, 2),
            "process_cpu_us_per_request_without": round(without_cpu / n * 1e6, 2),
        }

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=55_000, help="offered events per second")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of sustained load")
    ap.add_argument("--quick", action="store_true", help="10 s smoke run")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--capacity-events", type=int, default=500_000,
                    help="events pre-filled for the ingester-capacity run (0 skips it)")
    ap.add_argument("--topology", choices=["distributed", "embedded", "both"], default="both")
    ap.add_argument("--produce", metavar="BOOTSTRAP", help=argparse.SUPPRESS)  # the producer subprocess
    ap.add_argument("--spool", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.produce:
        asyncio.run(produce_main(a.produce, a.rate, a.duration, a.spool))
        return
    duration = 10.0 if a.quick else a.duration
    capacity_events = min(a.capacity_events, 100_000) if a.quick else a.capacity_events
    out: dict = {"targets": {"visible_events_per_s": 50_000, "lag_p99_s": 2.0, "added_us_per_request": 30.0}}
    with tempfile.TemporaryDirectory(prefix="servoloop-bench-ingest-") as tmp:
        cost = request_path_cost(Path(tmp) / "cost")
        print(f"request path: event emission adds {cost['added_us_per_request']} µs per request (p50; p99 "
              f"{cost['request_path_us_p99']} µs; {cost['events_per_request']} events); CPU with background shipping "
              f"{cost['process_cpu_us_per_request_with_shipping']} µs per request", flush=True)
        out["request_path"] = cost
        if capacity_events > 0 and not a.skip_ingest:
            cap = asyncio.run(ingest_capacity(capacity_events, Path(tmp) / "capacity"))
            print(f"ingester capacity: {cap['events_per_s']} events/s draining {cap['events']} events, "
                  f"{cap['cpu_us_per_event']} µs CPU per event", flush=True)
            out["ingest_capacity"] = cap
        topologies = [] if a.skip_ingest else ["distributed", "embedded"] if a.topology == "both" else [a.topology]
        for topology in topologies:
            print(f"sustained ingest ({topology}): {a.rate:.0f} events/s offered for {duration:.0f} s", flush=True)
            ingest = asyncio.run(sustained_ingest(a.rate, duration, Path(tmp) / topology, topology=topology))
            print(f"  visible {ingest['visible_events_per_s']} events/s, lag p50 {ingest['lag_p50_s']} s, "
                  f"p99 {ingest['lag_p99_s']} s; lost {ingest['lost_events']}, duplicates {ingest['duplicate_rows']}; "
                  f"CPU µs per event {ingest['cpu_us_per_event']}", flush=True)
            out[f"ingest_{topology}"] = ingest
    print(f"wrote {write_result('ingest', out)}")


if __name__ == "__main__":
    main()
