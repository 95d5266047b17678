"""Fault injection under load, reconciled: the real gateway (`servoloop serve`, the tiny model on vLLM or
Transformers) as a child process with its durable event sink, a tansu broker on local S3, `servoloop ingest` as a
child process, and ClickHouse SQL over HTTP (chDB behind the test endpoint, which can be made unavailable). Mixed
unary/streaming traffic with a rating for every answer runs at `--rate` for `--duration-s` (this process is only
the load generator, on aiohttp) while the broker is killed, the ingester is SIGKILLed and restarted, and the store
refuses every query; afterwards every accepted request must have exactly one inference row and every accepted
rating one feedback row. RSS of the gateway and the ingester processes is sampled.

    .venv/bin/python -m benchmarks.chaos --duration-s 600 --rate 200 --broker-down-s 60 --store-down-s 60 --out chaos_long
    .venv/bin/python -m benchmarks.chaos --fuzz      # the fuzz targets at 1,000 cases each (pytest, recorded)

Writes benchmarks/results/chaos.json (or chaos_fuzz.json). tests/reliability/test_chaos.py runs the bounded form.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
SERVOLOOP = str(Path(sys.executable).with_name("servoloop"))


@dataclass
class ChaosPlan:
    duration_s: float = 90.0
    rate_per_s: float = 8.0
    broker_down_s: float = 15.0
    store_down_s: float = 15.0
    stream_share: float = 0.33
    max_tokens: int = 4
    settle_timeout_s: float = 240.0
    engine: str = "transformers"  # the gateway's engine: transformers (starts in seconds) or vllm (batches 200 req/s)
    crash_duration_s: float = 90.0  # the gateway-crash scenario (SIGKILL at its middle)


@dataclass
class ChaosFigures:
    requests_sent: int = 0
    requests_accepted: int = 0
    requests_failed: int = 0  # any non-2xx or transport error: must be 0 (the faults are all behind the gateway)
    failure_samples: list[str] = field(default_factory=list)
    ratings_accepted: int = 0
    ratings_failed: int = 0
    inference_rows_missing: int = 0
    inference_rows_duplicated: int = 0
    missing_samples: list[str] = field(default_factory=list)  # "<id> stream|unary accepted at <s>": to chase a loss
    feedback_rows_missing: int = 0
    feedback_rows_duplicated: int = 0
    sink_rejected: dict[str, int] = field(default_factory=dict)  # events the gateway's sink refused (must be empty)
    sink_pending_at_close: int = 0  # events still in the spool when the gateway stopped (stay on disk)
    faults: list[str] = field(default_factory=list)
    settle_s: float = 0.0
    achieved_rate_per_s: float = 0.0  # requests sent per second (the offered load held)
    completed_rate_per_s: float = 0.0  # requests answered per second, to the last answer
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    gateway_rss_mib_warm: float = 0.0
    gateway_rss_mib_end: float = 0.0
    gateway_rss_growth_pct: float = 0.0
    ingester_rss_mib_warm: float = 0.0
    ingester_rss_mib_end: float = 0.0
    ingester_rss_growth_pct: float = 0.0


class IngestChild:
    """`servoloop ingest --config FILE` as a child process (SIGKILL-able); every run appends to one log."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVOLOOP_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([SERVOLOOP, "ingest", "--config", str(self.config), "--progress-every", "5"],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         cwd=self.config.parent)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout_s: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mib(self) -> tuple[int, float] | None:
        """(pid, RSS MiB) of the running child; None between a kill and its restart."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            rss = psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except psutil.Error:
            return None
        return (self.proc.pid, rss) if rss > 0 else None


def _growth(samples: list[float]) -> tuple[float, float, float]:
    """(warm MiB, end MiB, growth %): warm = median of the second fifth of the run, end = median of the last fifth."""
    if len(samples) < 10:
        return (0.0, 0.0, 0.0) if not samples else (
            round(samples[0], 1), round(samples[-1], 1), round(100 * (samples[-1] - samples[0]) / samples[0], 2))
    n = len(samples)
    warm, end = statistics.median(samples[n // 5: 2 * n // 5]), statistics.median(samples[-n // 5:])
    return round(warm, 1), round(end, 1), round(100 * (end - warm) / warm, 2)


async def _one(c: aiohttp.ClientSession, url: str, i: int, plan: ChaosPlan, key: str, fig: ChaosFigures,
               inference_ids: list[str], feedback_ids: list[str], latencies: list[float]) -> None:
    stream = (i % 100) < plan.stream_share * 100
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}"}],
            "max_tokens": plan.max_tokens, "temperature": 0, "stream": stream}
    auth = {"Authorization": f"Bearer {key}"}
    t0 = time.perf_counter()
    fig.requests_sent += 1
    try:
        async with c.post(f"{url}/v1/chat/completions", json=body, headers=auth) as r:
            data = await r.text()
            ok = r.status == 200 and (not stream or "[DONE]" in data)
            rid = data.split('"id":"', 1)[1].split('"', 1)[0] if ok else ""
    except (TimeoutError, aiohttp.ClientError) as e:
        ok, data, rid = False, repr(e), ""
    if not ok:
        fig.requests_failed += 1
        if len(fig.failure_samples) < 10:
            fig.failure_samples.append(data[:300])
        return
    latencies.append((time.perf_counter() - t0) * 1000)
    fig.requests_accepted += 1
    inference_ids.append(rid)
    _ACCEPTED[rid] = f"{'stream' if stream else 'unary'} accepted at {time.monotonic():.1f}"
    try:
        async with c.post(f"{url}/v1/feedback", json={"target_id": rid, "thumbs": "up" if i % 2 else "down"},
                          headers=auth) as r:
            if r.status == 201:
                fig.ratings_accepted += 1
                feedback_ids.append((await r.json())["id"])
            else:
                fig.ratings_failed += 1
    except (TimeoutError, aiohttp.ClientError):
        fig.ratings_failed += 1


_ACCEPTED: dict[str, str] = {}  # id -> how and when it was accepted (monotonic s), for the missing samples


async def _count_by_id(store: Any, table: str, column: str, ids: list[str]) -> Counter[str]:
    found: Counter[str] = Counter()
    for i in range(0, len(ids), 2000):
        chunk = ids[i:i + 2000]
        t = await store.query(f"SELECT {column} AS id, count() AS n FROM (SELECT * FROM {table} FINAL) "
                              f"WHERE {column} IN {{ids:Array(String)}} GROUP BY id", {"ids": chunk})
        found.update(dict(zip(t.column("id").to_pylist(), t.column("n").to_pylist(), strict=True)))
    return found


async def _generate_load(url: str, key: str, plan: ChaosPlan) -> dict[str, Any]:
    """The open-loop traffic (a rating for every answer) for `plan.duration_s`; returns what was accepted."""
    fig = ChaosFigures()
    inference_ids: list[str] = []
    feedback_ids: list[str] = []
    latencies: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=512)) as c:
        start = time.monotonic()
        i = 0
        while (now := time.monotonic()) - start < plan.duration_s:
            while i < (now - start) * plan.rate_per_s:
                t = asyncio.create_task(_one(c, url, i, plan, key, fig, inference_ids, feedback_ids, latencies))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
            await asyncio.sleep(0.005)
        fig.achieved_rate_per_s = round(i / (time.monotonic() - start), 2)
        await asyncio.gather(*tasks)
        fig.completed_rate_per_s = round(fig.requests_accepted / (time.monotonic() - start), 2)
    return {"figures": asdict(fig), "inference_ids": inference_ids, "feedback_ids": feedback_ids,
            "latencies_ms": latencies, "accepted": {k: _ACCEPTED[k] for k in inference_ids if k in _ACCEPTED}}


class LoadChild:
    """`python -m benchmarks.chaos --load …`: the traffic from a process of its own, so the harness (which serves
    the store's HTTP endpoint on its threads) never competes with the load generator for one interpreter."""

    def __init__(self, url: str, key: str, plan: ChaosPlan, out: Path):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.chaos", "--load", json.dumps({"url": url, "key": key, "plan": asdict(plan)}),
             "--load-out", str(out)], cwd=REPO, stdin=subprocess.DEVNULL)

    async def result(self) -> dict[str, Any]:
        if await asyncio.to_thread(self.proc.wait) != 0:
            raise RuntimeError(f"the load generator exited with {self.proc.returncode}")
        return json.loads(self.out.read_text())


def _metric_samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric in a Prometheus text exposition (labels as written, '' for none)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            labels = line[len(name):].rsplit(" ", 1)[0].strip()
            out[labels] = float(line.rsplit(" ", 1)[1])
    return out


async def _sink_state(c: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[dict[str, int], int]:
    """The gateway's sink, read from its /metrics once nothing is pending (or at the timeout): (rejected by
    reason, pending)."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with c.get(f"{url}/metrics") as r:
            text = await r.text()
        samples = _metric_samples(text, "servoloop_sink_pending_events")
        if not samples:
            raise RuntimeError(f"{url}/metrics has no servoloop_sink_pending_events")
        pending = int(sum(samples.values()))
        if pending == 0 or time.monotonic() > deadline:
            rejected = {k: int(v) for k, v in _metric_samples(text, "servoloop_sink_rejected_events_total").items() if v}
            return rejected, pending
        await asyncio.sleep(0.5)


def _rss_mib(proc: subprocess.Popen[bytes] | None) -> float | None:
    try:
        return psutil.Process(proc.pid).memory_info().rss / 2**20 if proc is not None and proc.poll() is None else None
    except psutil.Error:
        return None


async def run_chaos(plan: ChaosPlan, *, broker: Any, model_dir: Path, work: Path) -> ChaosFigures:
    """Run the load with its faults and reconcile; `broker` is an EmbeddedBroker that keeps data across kills."""
    from feedback.store import ChdbStore
    from gateway.auth import KeyStore
    from schemas.topics import all_topics
    from tests.support.clickhouse_http import shared_chdb_session, shared_endpoint

    work.mkdir(parents=True, exist_ok=True)
    prefix = f"chaos{uuid.uuid4().hex[:6]}."
    database = f"chaos_{uuid.uuid4().hex[:10]}"
    broker.create_topics(all_topics(prefix), partitions=2)
    endpoint, view = shared_endpoint(), ChdbStore(shared_chdb_session(), database)
    config = work / "servoloop.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(work / "ingest-data"), "events": {
        "broker": {"mode": "external", "bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix},
        "store": {"kind": "clickhouse", "url": endpoint.url, "database": database},
        "ingest": {"group_id": f"g-{prefix}", "batch_max_events": 2000, "batch_max_wait_s": 0.2}}}))
    ingester = IngestChild(config, work / "ingest.log")
    ingester.start()
    gateway = GatewayChild(work, model_dir, broker.bootstrap_servers, prefix, plan.max_tokens, engine=plan.engine)
    _, key = KeyStore(gateway.data_dir / "keys.sqlite").create("chaos", ["infer", "feedback"])
    gateway.start()
    await asyncio.to_thread(gateway.wait_ready)

    gw_rss: list[float] = []
    ing_rss: list[tuple[int, float]] = []
    faults: list[str] = []
    d = plan.duration_s
    schedule = [
        (0.15 * d, "broker killed", broker.kill), (0.15 * d + plan.broker_down_s, "broker restarted", broker.start),
        (0.45 * d, "ingester SIGKILLed", ingester.kill), (0.45 * d + 2, "ingester restarted", ingester.start),
    ]
    outage_at, outage = 0.6 * d, None
    try:
        load = LoadChild(gateway.url, key, plan, work / "load.json")
        start = next_sample = time.monotonic()
        while load.proc.poll() is None:
            now = time.monotonic()
            elapsed = now - start
            while schedule and elapsed >= schedule[0][0]:
                _, what, act = schedule.pop(0)
                await asyncio.to_thread(act)
                faults.append(f"{what} at {elapsed:.1f}s")
            if outage is None and elapsed >= outage_at:
                outage = endpoint.outage("refuse", database=database)
                outage.__enter__()
                faults.append(f"store unavailable at {elapsed:.1f}s")
            elif outage is not None and outage is not False and elapsed >= outage_at + plan.store_down_s:
                outage.__exit__(None, None, None)
                outage = False
                faults.append(f"store back at {elapsed:.1f}s")
            if now >= next_sample:
                if (g := _rss_mib(gateway.proc)) is not None:
                    gw_rss.append(g)
                if (r := ingester.rss_mib()) is not None and outage is False:
                    ing_rss.append(r)  # after the last fault: the ingester's restart and backlog are behind it
                next_sample += 1.0
            await asyncio.sleep(0.05)
        got = await load.result()
        fig = ChaosFigures(**got["figures"])
        fig.faults = faults
        inference_ids, feedback_ids, latencies = got["inference_ids"], got["feedback_ids"], got["latencies_ms"]
        _ACCEPTED.update(got["accepted"])
        async with aiohttp.ClientSession() as c:  # the broker has everything the gateway accepted, or it is counted here
            fig.sink_rejected, fig.sink_pending_at_close = await _sink_state(c, gateway.url, 60)
    finally:
        if outage:
            outage.__exit__(None, None, None)
        for what, act in (("broker", broker.start), ("ingester", ingester.start)):
            if (what == "broker" and not broker.running) or (what == "ingester" and ingester.proc.poll() is not None):
                await asyncio.to_thread(act)
        await asyncio.to_thread(gateway.terminate)

    t0 = time.monotonic()
    while True:  # settle: everything accepted reaches the store
        inf = await _count_by_id(view, "inferences", "request_id", inference_ids)
        fb = await _count_by_id(view, "feedback", "event_id", feedback_ids)
        if (len(inf) == len(set(inference_ids)) and len(fb) == len(set(feedback_ids))) \
                or time.monotonic() - t0 > plan.settle_timeout_s:
            break
        if (r := ingester.rss_mib()) is not None:
            ing_rss.append(r)
        await asyncio.sleep(1.0)
    fig.settle_s = round(time.monotonic() - t0, 1)
    ingester.terminate()
    fig.inference_rows_missing = len(set(inference_ids) - set(inf))
    fig.missing_samples = [f"{i} {_ACCEPTED.get(i, '')} (run started at {start:.1f})"
                           for i in sorted(set(inference_ids) - set(inf))[:10]]
    fig.inference_rows_duplicated = sum(n - 1 for n in inf.values() if n > 1) + len(inference_ids) - len(set(inference_ids))
    fig.feedback_rows_missing = len(set(feedback_ids) - set(fb))
    fig.feedback_rows_duplicated = sum(n - 1 for n in fb.values() if n > 1)
    if latencies:
        latencies.sort()
        fig.latency_p50_ms = round(latencies[len(latencies) // 2], 1)
        fig.latency_p99_ms = round(latencies[int(len(latencies) * 0.99) - 1], 1)
    fig.gateway_rss_mib_warm, fig.gateway_rss_mib_end, fig.gateway_rss_growth_pct = _growth(gw_rss)
    # The ingester restarts mid-run and catches up after the store outage: its growth is measured from then on.
    last = [rss for pid, rss in ing_rss if ing_rss and pid == ing_rss[-1][0]]
    fig.ingester_rss_mib_warm, fig.ingester_rss_mib_end, fig.ingester_rss_growth_pct = _growth(last)
    await view.query(f"DROP DATABASE IF EXISTS {database}")
    return fig


@dataclass
class CrashFigures:
    requests_sent: int = 0
    requests_accepted: int = 0
    errors_in_flight_at_kill: int = 0  # started before the SIGKILL, failed by it: the only errors allowed
    refused_while_down: int = 0  # sent while no gateway listened (connection refused), not accepted
    errors_otherwise: int = 0  # anything else: must be 0
    error_samples: list[str] = field(default_factory=list)
    inference_rows_missing: int = 0
    inference_rows_duplicated: int = 0
    missing_samples: list[str] = field(default_factory=list)  # "<id> answered <s> before|after the kill"
    accepted_before_kill: int = 0  # their events were only in the killed gateway's spool (the broker was down)
    restart_ready_s: float = 0.0
    settle_s: float = 0.0


class GatewayChild:
    """`servoloop serve` with an external broker: its events go through its own spool in `data_dir`."""

    def __init__(self, work: Path, model_dir: Path, bootstrap: str, prefix: str, max_tokens: int, *,
                 engine: str = "transformers"):
        from benchmarks.common import free_port

        self.http_port, self.grpc_port = free_port(), free_port()
        self.data_dir = work / "gateway-data"
        self.config = work / "gateway.yaml"
        self.config.write_text(yaml.safe_dump({"data_dir": str(self.data_dir), "gateway": {
            "host": "127.0.0.1", "http_port": self.http_port, "grpc_port": self.grpc_port,
            "models": [{"name": "tiny", "engine": engine, "path": str(model_dir),
                        **({"max_concurrency": 64} if engine == "vllm" else {})}],
            "limits": {"max_output_tokens": max_tokens, "default_max_tokens": max_tokens},
            "rate_limits": {"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent_streams": 0}},
            "events": {"broker": {"mode": "external", "bootstrap_servers": bootstrap, "topic_prefix": prefix}}}))
        self.log = work / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SERVOLOOP_")},
               "SERVOLOOP_CONFIG": str(self.config)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([SERVOLOOP, "serve"], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

    def wait_ready(self, timeout_s: float = 240) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not ready:\n{self.log.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


async def run_gateway_crash(plan: ChaosPlan, *, broker: Any, model_dir: Path, work: Path) -> CrashFigures:
    """SIGKILL a loaded gateway whose broker is down (its accepted events wait in its spool), restart both, and
    reconcile: every accepted request has exactly one inference row; only requests in flight at the kill failed."""
    from feedback.store import ChdbStore
    from gateway.auth import KeyStore
    from schemas.topics import all_topics
    from tests.support.clickhouse_http import shared_chdb_session, shared_endpoint

    work.mkdir(parents=True, exist_ok=True)
    prefix = f"crash{uuid.uuid4().hex[:6]}."
    database = f"crash_{uuid.uuid4().hex[:10]}"
    broker.create_topics(all_topics(prefix), partitions=2)
    endpoint, view = shared_endpoint(), ChdbStore(shared_chdb_session(), database)
    config = work / "ingest.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(work / "ingest-data"), "events": {
        "broker": {"mode": "external", "bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix},
        "store": {"kind": "clickhouse", "url": endpoint.url, "database": database},
        "ingest": {"group_id": f"g-{prefix}", "batch_max_events": 2000, "batch_max_wait_s": 0.2}}}))
    ingester = IngestChild(config, work / "ingest.log")
    ingester.start()
    gateway = GatewayChild(work, model_dir, broker.bootstrap_servers, prefix, plan.max_tokens, engine=plan.engine)
    _, key = KeyStore(gateway.data_dir / "keys.sqlite").create("crash", ["infer", "feedback"])
    gateway.start()
    await asyncio.to_thread(gateway.wait_ready)

    fig = CrashFigures()
    accepted: list[str] = []
    answered_at: dict[str, float] = {}  # id -> when its answer arrived (monotonic s)
    d = plan.crash_duration_s
    kill_at, killed_at, back_at = 0.5 * d, None, None
    tasks: set[asyncio.Task[None]] = set()

    async def one(c: httpx.AsyncClient, i: int) -> None:
        started = time.monotonic()
        fig.requests_sent += 1
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": plan.max_tokens}
        try:
            r = await c.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            if r.status_code == 200:
                fig.requests_accepted += 1
                accepted.append(r.json()["id"])
                answered_at[accepted[-1]] = time.monotonic()
                return
            error = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            error = repr(e)
        if killed_at is not None and started < killed_at:
            fig.errors_in_flight_at_kill += 1
        elif killed_at is not None and (back_at is None or started < back_at) and "ConnectError" in error:
            fig.refused_while_down += 1
        else:
            fig.errors_otherwise += 1
            if len(fig.error_samples) < 10:
                fig.error_samples.append(error)

    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as c:
            start = time.monotonic()
            await asyncio.to_thread(broker.kill)  # from here on, accepted events wait in the gateway's spool
            i = 0
            while (now := time.monotonic()) - start < d:
                if killed_at is None and now - start >= kill_at:
                    killed_at = time.monotonic()
                    gateway.kill()
                    fig.accepted_before_kill = fig.requests_accepted  # their events: only in the killed spool
                    await asyncio.to_thread(broker.start)
                    gateway.start()
                    fig.restart_ready_s = round(await asyncio.to_thread(gateway.wait_ready), 1)
                    back_at = time.monotonic()
                while i < (now - start) * plan.rate_per_s:
                    t = asyncio.create_task(one(c, i))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    i += 1
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
    finally:
        if not broker.running:
            await asyncio.to_thread(broker.start)
        gateway.terminate()

    t0 = time.monotonic()
    while True:
        inf = await _count_by_id(view, "inferences", "request_id", accepted)
        if len(inf) == len(set(accepted)) or time.monotonic() - t0 > plan.settle_timeout_s:
            break
        await asyncio.sleep(1.0)
    fig.settle_s = round(time.monotonic() - t0, 1)
    ingester.terminate()
    fig.inference_rows_missing = len(set(accepted) - set(inf))
    for i in sorted(set(accepted) - set(inf), key=answered_at.__getitem__)[:10]:
        dt = answered_at[i] - (killed_at or answered_at[i])
        fig.missing_samples.append(f"{i} answered {abs(dt):.2f}s {'before' if dt <= 0 else 'after'} the kill")
    fig.inference_rows_duplicated = sum(n - 1 for n in inf.values() if n > 1) + len(accepted) - len(set(accepted))
    await view.query(f"DROP DATABASE IF EXISTS {database}")
    return fig


async def _main_chaos(plan: ChaosPlan) -> dict[str, Any]:
    from feedback.broker import EmbeddedBroker, LocalS3

    model_dir = Path(os.environ.get("SERVOLOOP_TEST_MODEL", REPO / ".servoloop" / "models" / "tiny-chat"))
    work = Path(tempfile.mkdtemp(prefix="servoloop-chaos-"))
    with LocalS3() as s3:
        broker = EmbeddedBroker.on_s3(s3, f"b{uuid.uuid4().hex[:12]}", log_path=work / "tansu.log")
        broker.start()
        try:
            fig = await run_chaos(plan, broker=broker, model_dir=model_dir, work=work / "faults")
            crash = await run_gateway_crash(plan, broker=broker, model_dir=model_dir, work=work / "crash")
        finally:
            broker.kill()
    return {"plan": asdict(plan), "figures": asdict(fig), "gateway_crash": asdict(crash)}


def _fuzz(cases: int) -> dict[str, Any]:
    env = {**os.environ, "SERVOLOOP_FUZZ_CASES": str(cases)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/reliability/test_fuzz_http.py",
           "tests/reliability/test_fuzz_grpc.py", "tests/reliability/test_fuzz_inputs.py"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [json.loads(ln.split("FUZZ ", 1)[1]) for ln in proc.stdout.splitlines() if "FUZZ {" in ln]
    return {"cases_per_target": cases, "passed": proc.returncode == 0, "wall_s": round(time.monotonic() - t0, 1),
            "targets": lines, "tail": proc.stdout.splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second (each answer is also rated)")
    ap.add_argument("--broker-down-s", type=float, default=60.0)
    ap.add_argument("--store-down-s", type=float, default=60.0)
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm",
                    help="the gateway's engine for the tiny model (vllm batches the 200 req/s of the long form)")
    ap.add_argument("--settle-timeout-s", type=float, default=600.0,
                    help="after the load, how long every accepted row may take to reach the store")
    ap.add_argument("--out", default="chaos", help="results/<out>.json")
    ap.add_argument("--fuzz", action="store_true", help="run the fuzz targets at --fuzz-cases each instead")
    ap.add_argument("--load", help=argparse.SUPPRESS)  # the load generator child: {"url", "key", "plan"}
    ap.add_argument("--load-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--fuzz-cases", type=int, default=1000)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.load:
        spec = json.loads(args.load)
        out = asyncio.run(_generate_load(spec["url"], spec["key"], ChaosPlan(**spec["plan"])))
        args.load_out.write_text(json.dumps(out))
        return
    from benchmarks.common import machine, write_result

    command = " ".join([".venv/bin/python -m benchmarks.chaos", *sys.argv[1:]])
    if args.fuzz:
        result = {"command": command, "machine": machine(), **_fuzz(args.fuzz_cases)}
        print(write_result("chaos_fuzz", result))
        return
    plan = ChaosPlan(duration_s=args.duration_s, rate_per_s=args.rate, broker_down_s=args.broker_down_s,
                     store_down_s=args.store_down_s, engine=args.engine, settle_timeout_s=args.settle_timeout_s,
                     crash_duration_s=min(args.duration_s, 90.0))
    result = {"command": command, "machine": machine(), **asyncio.run(_main_chaos(plan))}
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
