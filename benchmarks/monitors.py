"""One full monitor cycle (every quality monitor + request and prompt-embedding drift) over 1M inference rows.

The store is chDB in a temporary directory, seeded in ClickHouse itself (INSERT … SELECT FROM numbers()):
`--inferences` rows over the last 25 hours (the bundled policy compares the last hour with the 24 before it),
4 tenants and 2 versions, 50 prompt templates, 1 % errors, some guardrail findings; `--feedback` ratings
(thumbs, ratings, corrections, preferences) on them. A first cycle fills the prompt-embedding cache (the
drift monitor samples ≤ 2,000 prompts per window); the timed cycles then run with embeddings precomputed,
as in steady state. Target: ≤ 5 s per cycle. With `--drift-rows` above 20,000 the per-column tests read a
uniform 20,000-row subsample of each window's sample (DriftSettings.stat_rows; `--drift-stat-rows 0`: all).

    .venv/bin/python benchmarks/monitors.py                          # 1M inferences, 100k feedback, 3 cycles
    .venv/bin/python benchmarks/monitors.py --inferences 100000 --feedback 10000 --cycles 1   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write_result
from feedback.monitors.policy import PolicyFile, bundled_policy_text, load_policy
from feedback.monitors.runner import default_monitors, run_cycle
from feedback.store import ChdbStore, count_rows, migrate

HOUR_MS = 3_600_000
ID = "lower(hex(sipHash128('inference', {n})))"  # a deterministic id per row number, shared with the feedback

SEED_INFERENCES = f"""
INSERT INTO inferences (event_id, schema_version, ts, tenant, request_id, key_id, user, model, model_version,
    engine, operation, messages, response, temperature, top_p, max_tokens, tokens_in, tokens_out, ttft_ms,
    latency_ms, status, error_code, finish_reason, cache_hit, stream, input_action, output_action, guardrail_types)
SELECT {ID.format(n="number")}, 1,
    fromUnixTimestamp64Milli(toInt64({{now_ms:Int64}} - 25 * {HOUR_MS} + intDiv(number * 25 * {HOUR_MS}, {{n:UInt64}}))),
    ['acme', 'globex', 'initech', 'umbrella'][number % 4 + 1], '', 'key-' || toString(number % 4),
    'user-' || toString(number % 1000), 'tiny-chat', ['base', 'v2'][intDiv(number, 4) % 2 + 1], 'vllm', 'chat',
    [('user', concat(['What is the capital of ', 'How do I cook ', 'Explain the history of ', 'Write a poem about ',
                      'Summarise the news on '][number % 5 + 1], toString(number % 10), ' please?'))],
    'Sure! Here is a short answer for you.', 0.7, 1.0, 128,
    15 + number % 40, 20 + number % 100, 15 + (number % 50) / 2.0, 80 + (number % 300),
    if(number % 100 = 0, 'error', 'ok'), if(number % 100 = 0, 'engine_unavailable', ''),
    if(number % 100 = 0, '', 'stop'), number % 20 = 0, number % 3 = 0,
    if(number % 50 = 1, 'redact', 'allow'), if(number % 200 = 3, 'block', 'allow'),
    multiIf(number % 50 = 1, ['EMAIL'], number % 200 = 3, ['AWS_ACCESS_KEY'], [])
FROM numbers({{n:UInt64}})
"""

SEED_FEEDBACK = f"""
INSERT INTO feedback (event_id, schema_version, ts, tenant, target_id, kind, metric_name, thumbs, rating,
    correction, preferred_id, other_id, key_id, user)
SELECT lower(hex(sipHash128('feedback', number))), 1,
    fromUnixTimestamp64Milli(toInt64({{now_ms:Int64}} - 25 * {HOUR_MS} + intDiv(t * 25 * {HOUR_MS}, {{n:UInt64}}) + 5000)),
    ['acme', 'globex', 'initech', 'umbrella'][t % 4 + 1], {ID.format(n="t")},
    ['thumbs', 'thumbs', 'thumbs', 'rating', 'correction', 'preference'][number % 6 + 1],
    ['thumbs', 'thumbs', 'thumbs', 'rating', 'correction', 'preference'][number % 6 + 1],
    if(number % 6 < 3, cityHash64(number) % 10 < 8, NULL), if(number % 6 = 3, toFloat64(1 + number % 5), NULL),
    if(number % 6 = 4, 'A better answer.', ''),
    if(number % 6 = 5, {ID.format(n="t")}, ''), if(number % 6 = 5, {ID.format(n="t + 4")}, ''),
    'key-' || toString(t % 4), 'user-' || toString(t % 1000)
FROM (SELECT number, intDiv(number * {{n:UInt64}}, {{f:UInt64}}) AS t FROM numbers({{f:UInt64}}))
"""


async def main_async(a: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="servoloop-bench-monitors-"))
    store = ChdbStore.open(tmp / "chdb", "servoloop")
    await migrate(store)
    now_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    await store.query(SEED_INFERENCES, {"now_ms": now_ms, "n": a.inferences})
    await store.query(SEED_FEEDBACK, {"now_ms": now_ms, "n": a.inferences, "f": a.feedback})
    await store.query("OPTIMIZE TABLE inferences FINAL")
    await store.query("OPTIMIZE TABLE feedback FINAL")
    seeded = {"inference_rows": await count_rows(store, "inferences"), "feedback_rows": await count_rows(store, "feedback"),
              "seed_s": round(time.perf_counter() - t0, 1)}
    print(f"seeded {seeded['inference_rows']} inferences, {seeded['feedback_rows']} feedback in {seeded['seed_s']} s",
          flush=True)
    policy = (load_policy(None) if a.drift_rows is None
              else drift_policy(tmp, a.drift_rows, a.drift_prompts, a.drift_stat_rows))
    monitors = default_monitors(tmp / "reports")
    published: list = []

    async def publish(events: list) -> None:  # type: ignore[type-arg]
        published.extend(events)

    t0 = time.perf_counter()
    warm = await run_cycle(store, policy, now_ms=now_ms, publish=publish, monitors=monitors)
    warm_s = time.perf_counter() - t0
    print(f"warm-up cycle (fills the embedding cache): {warm_s:.2f} s, {len(warm.results)} results, "
          f"errors {warm.errors or 'none'}", flush=True)
    timings, cpu = [], []
    last = warm
    for i in range(a.cycles):
        t0, c0 = time.perf_counter(), time.process_time()
        last = await run_cycle(store, policy, now_ms=now_ms, publish=publish, monitors=monitors)
        timings.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"cycle {i + 1}: {timings[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU in this process, "
              f"{len(last.results)} results, errors {last.errors or 'none'}", flush=True)
    await store.aclose()
    return {
        **seeded, "policy": "bundled (feedback/monitors/default_policy.yaml)" + (
            "" if a.drift_rows is None else f", drift max_rows={a.drift_rows} max_embeddings={a.drift_prompts}"
                                            f" stat_rows={a.drift_stat_rows if a.drift_stat_rows is not None else 20_000}"),
        "drift_max_rows_per_window": a.drift_rows or 5000, "drift_max_prompts_per_window": a.drift_prompts or 2000,
        # rows per window that the per-column tests read (DriftSettings.stat_rows): a uniform subsample
        "drift_stat_rows_per_window": min(a.drift_rows or 5000, 20_000 if a.drift_stat_rows is None
                                          else a.drift_stat_rows or a.drift_rows or 5000),
        "monitor_entries": len(policy.active), "results_per_cycle": len(last.results),
        "warmup_cycle_s": round(warm_s, 2), "cycle_s": [round(x, 2) for x in timings],
        "cycle_median_s": round(statistics.median(timings), 2) if timings else None,
        "cycle_cpu_median_s": round(statistics.median(cpu), 2) if cpu else None,
        "errors": last.errors, "target_cycle_s": 5.0,
    }


def drift_policy(tmp: Path, rows: int, prompts: int | None, stat_rows: int | None = None) -> PolicyFile:
    """The bundled policy with the drift monitors' per-window sample sizes raised (default: 5,000 rows, 2,000 prompts).

    `stat_rows`: rows of the sample the per-column tests read (None: DriftSettings' default, 20,000; 0: all).
    """
    doc = yaml.safe_load(bundled_policy_text())
    for entry in doc["monitors"]:
        if entry.get("kind") == "drift":
            entry["params"] = {**entry.get("params", {}), "max_rows": rows, "max_embeddings": prompts or 2000}
            if stat_rows is not None:
                entry["params"]["stat_rows"] = stat_rows or None
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_policy(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inferences", type=int, default=1_000_000)
    ap.add_argument("--feedback", type=int, default=100_000)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--drift-rows", type=int, default=None, help="rows sampled per window by the drift monitors")
    ap.add_argument("--drift-prompts", type=int, default=None, help="prompts embedded per window by the drift monitors")
    ap.add_argument("--drift-stat-rows", type=int, default=None,
                    help="rows per window the per-column drift tests read (default 20,000; 0: all --drift-rows)")
    ap.add_argument("--out", default="monitors", help="result name (benchmarks/results/<out>.json)")
    a = ap.parse_args()
    out = asyncio.run(main_async(a))
    print(f"wrote {write_result(a.out, out)}")


if __name__ == "__main__":
    main()
