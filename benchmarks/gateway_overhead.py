"""Gateway overhead: a fixed-latency OpenAI-compatible upstream measured directly and through the gateway.

Open-loop load (requests start on schedule whether or not earlier ones finished) at each offered rate,
for a fixed duration, against: the upstream directly, the gateway over HTTP, the gateway over gRPC —
with auth and rate limiting on. Added latency = gateway percentile - direct percentile at the same rate.
Two gateway processes run side by side: `gateway` (auth + rate limits: the configuration the target is
for) and `guarded` (the same plus the default guardrail policy on input and output), so what the
guardrails add is measured in the same run (their own per-KB figures are in benchmarks/guardrails.py).
Then streaming: tokens/s of the real engine on the tiny model alone vs. through the guarded gateway.

    .venv/bin/python benchmarks/gateway_overhead.py            # full run (≈3 min)
    .venv/bin/python benchmarks/gateway_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import free_port, pct, process_cpu_s, wait_http, write_result
from schemas.pb import inference_pb2 as pb
from schemas.pb import inference_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "fixed", "messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 16}


async def open_loop(send: Callable[[], Awaitable[bool]], rate: float, duration: float) -> dict:
    """Start `rate` requests per second for `duration` seconds; latencies measured per request."""
    loop = asyncio.get_running_loop()
    n = int(rate * duration)
    latencies: list[float] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        t0 = time.perf_counter()
        ok = await send()
        if ok:
            latencies.append((time.perf_counter() - t0) * 1000)
        else:
            failures += 1

    start = loop.time() + 0.05
    tasks = []
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    sent_by = loop.time()
    await asyncio.gather(*tasks)
    wall = loop.time() - start
    return {"offered_rps": rate, "achieved_rps": round(len(latencies) / wall, 1), "requests": n,
            "failures": failures, "latencies": latencies,
            "schedule_lag_ms": round((sent_by - start - (n - 1) / rate) * 1000, 2)}


def _pooled(runs: list[dict], rate: float) -> dict:
    lat = [x for r in runs for x in r["latencies"]]
    return {"offered_rps": rate, "achieved_rps": round(statistics.fmean(r["achieved_rps"] for r in runs), 1),
            "requests": sum(r["requests"] for r in runs), "failures": sum(r["failures"] for r in runs),
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99)}


@dataclass(frozen=True)
class GatewayUnderTest:
    name: str  # gateway | guarded
    http: str
    grpc: str
    pid: int


async def measure_unary(upstream_url: str, gateways: list[GatewayUnderTest], key: str, rates: list[int],
                        duration: float, rounds: int) -> list[dict]:
    """Per rate: `rounds` alternating slices of direct and each gateway over HTTP and gRPC (duration/rounds seconds
    each), pooled, so a burst of outside load hits all alike; each gateway process's CPU per request is read
    from /proc."""
    rows = []
    conn = aiohttp.TCPConnector(limit=2000)
    auth = {"Authorization": f"Bearer {key}"}
    grpc_req = pb.GenerateRequest(model="fixed", messages=[pb.ChatMessage(role="user", content="Say something short.")],
                                  params=pb.SamplingParams(max_tokens=16))
    md = (("authorization", f"Bearer {key}"),)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=conn))

        async def direct() -> bool:
            async with http.post(f"{upstream_url}/chat/completions", json=BODY) as r:
                await r.read()
                return r.status == 200

        def over_http(base: str) -> Callable[[], Awaitable[bool]]:
            async def send() -> bool:
                async with http.post(f"{base}/v1/chat/completions", json=BODY, headers=auth) as r:
                    await r.read()
                    return r.status == 200
            return send

        def over_grpc(stub: pb_grpc.InferenceStub) -> Callable[[], Awaitable[bool]]:
            async def send() -> bool:
                try:
                    await stub.Generate(grpc_req, metadata=md, timeout=30)
                    return True
                except grpc.aio.AioRpcError:
                    return False
            return send

        targets: list[tuple[str, Callable[[], Awaitable[bool]], int | None]] = [("direct", direct, None)]
        for gw in gateways:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(gw.grpc))
            targets += [(f"{gw.name}_http", over_http(gw.http), gw.pid),
                        (f"{gw.name}_grpc", over_grpc(pb_grpc.InferenceStub(channel)), gw.pid)]
        for _, send, _ in targets:  # warm connections and code paths
            await asyncio.gather(*(send() for _ in range(50)))
        for rate in rates:
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in targets}
            cpu: dict[str, float] = {name: 0.0 for name, _, _ in targets}
            for _ in range(rounds):
                for name, send, pid in targets:
                    before = process_cpu_s(pid) if pid else 0.0
                    runs[name].append(await open_loop(send, rate, duration / rounds))
                    cpu[name] += (process_cpu_s(pid) - before) if pid else 0.0
                    await asyncio.sleep(0.3)
            results = {name: _pooled(r, rate) for name, r in runs.items()}
            d = results["direct"]
            row = {"offered_rps": rate, "rounds": rounds,
                   **{f"{k}_{m}": v[m] for k, v in results.items()
                      for m in ("p50_ms", "p95_ms", "p99_ms", "achieved_rps", "failures")}}
            apis = [name for name, _, pid in targets if pid]
            for api in apis:
                row[f"{api}_cpu_ms_per_request"] = round(cpu[api] * 1000 / max(1, results[api]["requests"]), 3)
                for q in ("p50", "p95", "p99"):
                    row[f"{api}_added_{q}_ms"] = round(results[api][f"{q}_ms"] - d[f"{q}_ms"], 3)
            rows.append(row)
            print(f"{rate:5d} req/s  direct p50 {d['p50_ms']:.2f} p99 {d['p99_ms']:.2f}", flush=True)
            for api in apis:
                print(f"      {api:13s} +{row[f'{api}_added_p50_ms']:.2f} / +{row[f'{api}_added_p99_ms']:.2f} ms "
                      f"p50/p99 added, cpu {row[f'{api}_cpu_ms_per_request']} ms/req, "
                      f"{row[f'{api}_achieved_rps']} rps, {row[f'{api}_failures']} failures", flush=True)
    return rows


def settle(pids: list[int], *, idle_share: float = 0.05, quiet_s: float = 2.0, timeout_s: float = 120.0) -> float:
    """Wait until every process in `pids` has used under `idle_share` of a core for `quiet_s`; returns the wait.

    The streaming comparison follows the 1000 req/s overload: a gateway still working through it would be
    measured against an engine that is not.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        before = [process_cpu_s(p) for p in pids]
        time.sleep(quiet_s)
        if all(process_cpu_s(p) - b < idle_share * quiet_s for p, b in zip(pids, before, strict=True)):
            break
    return round(time.monotonic() - t0, 1)


async def measure_streaming(model_dir: Path, engine_kind: str, gw_http: str, key: str, streams: int,
                            max_tokens: int, rounds: int) -> dict:
    """Tokens/s of the engine alone (in this process) vs the same requests through the gateway process.

    Every request asks for exactly `max_tokens` (`min_tokens` = `max_tokens`), so both sides generate the same
    number of tokens; the two are measured in alternating rounds and compared by their medians.
    """
    from gateway.request import InferenceRequest, SamplingParams
    from gateway.server import make_engine
    from gateway.settings import ModelSettings

    prompts = [f"Story number {i}: once upon a time" for i in range(streams)]

    async def through_gateway(http: aiohttp.ClientSession) -> int:
        async def one(p: str) -> int:
            body = {"model": "tiny", "prompt": p, "max_tokens": max_tokens, "min_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            n = 0
            async with http.post(f"{gw_http}/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b"data: {") and b'"usage":{' in line:
                        n = json.loads(line[6:])["usage"]["completion_tokens"]
            return n
        return sum(await asyncio.gather(*(one(p) for p in prompts)))

    engine = make_engine(ModelSettings(name="tiny", engine=engine_kind, path=str(model_dir)))
    await engine.start()

    async def alone() -> int:
        async def one(p: str) -> int:
            req = InferenceRequest(model="tiny", operation="text_completion", prompt=p, stream=True,
                                   params=SamplingParams(max_tokens=max_tokens, temperature=0, min_tokens=max_tokens))
            last = None
            async for c in engine.stream(req):
                last = c
            return last.usage.completion_tokens if last and last.usage else 0
        return sum(await asyncio.gather(*(one(p) for p in prompts)))

    async def rate(run: Callable[[], Awaitable[int]]) -> tuple[float, int]:
        t0 = time.perf_counter()
        n = await run()
        return n / (time.perf_counter() - t0), n

    gw_rates: list[float] = []
    alone_rates: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            await through_gateway(http)  # warm both
            await alone()
            for _ in range(rounds):
                tps, gw_tokens = await rate(lambda: through_gateway(http))
                gw_rates.append(tps)
                tps, alone_tokens = await rate(alone)
                alone_rates.append(tps)
    finally:
        await engine.aclose()
    direct_tps, gw_tps = statistics.median(alone_rates), statistics.median(gw_rates)
    return {"engine": engine_kind, "concurrent_streams": streams, "tokens_per_stream": max_tokens, "rounds": rounds,
            "engine_alone_tokens_per_s": round(direct_tps, 1), "through_gateway_tokens_per_s": round(gw_tps, 1),
            "gateway_vs_engine_ratio": round(gw_tps / direct_tps, 3),
            "engine_alone_tokens_per_round": alone_tokens, "through_gateway_tokens_per_round": gw_tokens,
            "engine_alone_tokens_per_s_rounds": [round(x, 1) for x in alone_rates],
            "through_gateway_tokens_per_s_rounds": [round(x, 1) for x in gw_rates]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100,500,1000")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per rate and target")
    ap.add_argument("--upstream-latency-ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating direct/HTTP/gRPC slices per rate")
    ap.add_argument("--engine", default="auto", help="engine for the streaming part: vllm, transformers, auto")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=128, help="tokens generated per stream")
    ap.add_argument("--stream-rounds", type=int, default=5, help="alternating gateway / engine-alone rounds")
    ap.add_argument("--model", default=str(ROOT / ".servoloop/models/tiny-chat"))
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--no-streaming", action="store_true", help="skip the streaming comparison")
    ap.add_argument("--out", default="gateway_overhead", help="results file name (benchmarks/results/<out>.json)")
    a = ap.parse_args()
    rates = [int(r) for r in a.rates.split(",")]
    duration = 3.0 if a.quick else a.duration
    engine = a.engine
    if engine == "auto":
        from gateway.engines import vllm_available

        engine = "vllm" if vllm_available() else "transformers"

    tmp = Path(tempfile.mkdtemp(prefix="servoloop-bench-"))
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.support.openai_upstream", "--port", str(up_port),
                                 "--latency-ms", str(a.upstream_latency_ms), "--tokens", "16"], cwd=ROOT)
    procs: list[subprocess.Popen] = [upstream]
    gateways: list[GatewayUnderTest] = []
    env: dict[str, str] = {}
    # `gateway`: auth + rate limits only; `guarded`: the same with the default guardrail policy, and the local
    # engine for the streaming part (loaded only there, so it cannot disturb the unary figures of the other).
    for name, guarded in (("gateway", False), ("guarded", True)):
        http_port, grpc_port = free_port(), free_port()
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(f"""data_dir: {tmp}
log_level: WARNING
gateway:
  host: 127.0.0.1
  http_port: {http_port}
  grpc_port: {grpc_port}
  rate_limits: {{requests_per_minute: 10000000, tokens_per_minute: 1000000000, max_concurrent_streams: 1000}}
  limits: {{max_output_tokens: 2048}}
  guardrails: {{enabled: {str(guarded).lower()}}}
  models:
    - {{name: fixed, engine: remote, url: "http://127.0.0.1:{up_port}/v1", max_connections: 2000}}
""" + ("" if a.no_streaming or not guarded else f"""    - {{name: tiny, engine: {engine}, path: "{a.model}", max_concurrency: {a.streams}}}
"""))
        env = {**os.environ, "SERVOLOOP_CONFIG": str(cfg)}
        proc = subprocess.Popen([str(BIN / "servoloop"), "serve"], env=env, cwd=tmp)
        procs.append(proc)
        gateways.append(GatewayUnderTest(name, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc.pid))
    try:
        for gw, proc in zip(gateways, procs[1:], strict=True):
            wait_http(f"{gw.http}/readyz", 300, proc)
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", 30, upstream)
        key = subprocess.run([str(BIN / "servoloop"), "keys", "create", "--tenant", "bench"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        time.sleep(1.5)  # the gateways pick up the new key
        rows = asyncio.run(measure_unary(f"http://127.0.0.1:{up_port}/v1", gateways, key, rates, duration, a.rounds))
        settled_s = 0.0 if a.no_streaming else settle([gw.pid for gw in gateways] + [upstream.pid])
        streaming = {} if a.no_streaming else asyncio.run(measure_streaming(
            Path(a.model), engine, gateways[1].http, key, a.streams, a.stream_tokens,
            2 if a.quick else a.stream_rounds))
        if streaming:
            streaming["settled_before_s"] = settled_s
        if streaming:
            print(f"streaming ({engine}, {a.streams} streams): engine alone {streaming['engine_alone_tokens_per_s']} tok/s,"
                  f" through the guarded gateway {streaming['through_gateway_tokens_per_s']} tok/s "
                  f"(ratio {streaming['gateway_vs_engine_ratio']})")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    out = write_result(a.out, {
        "upstream_latency_ms": a.upstream_latency_ms, "duration_s_per_rate": duration, "unary": rows,
        "streaming": streaming,
        "gateways": {"gateway": "auth + rate limits", "guarded": "auth + rate limits + default guardrail policy"},
        "targets": {"added_p50_ms_at_500_rps": 1.0, "added_p99_ms_at_500_rps": 3.0, "streaming_ratio": 0.95},
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
