"""Acceptance: two `servoloop serve` processes under continuous load follow a promotion and a rollback.

Both gateways serve the tiny model (Transformers, then vLLM) and learn model versions from the external broker's
`models` topic. Clients keep calling both over HTTP and gRPC, unary and streaming, while the test publishes the
rows the registry writes for a promotion (`base` retired, `v1` active) and then for a rollback (`v1`
rolled_back, `base` active). Checked per gateway: the new version answers within 2 s of the publish, every
request sent after the first such answer reports it (versions never go backwards), a stream reports one version
in every chunk, and no request fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from feedback.broker import EmbeddedBroker
from gateway.auth import KeyStore
from schemas.pb import inference_pb2 as pb
from schemas.pb import inference_pb2_grpc as pb_grpc
from schemas.topics import all_topics
from tests.gateway.hotswap_support import Adapter, ModelEventProducer, model_event

BIN = Path(sys.executable).parent
MSG = [{"role": "user", "content": "Write a haiku about the sea."}]
SWITCH_WITHIN_S = 2.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    http: str
    grpc: str
    log: Path


@dataclass
class Observed:
    gateway: int
    api: str
    sent: float
    got: float  # when the version was known: the unary answer, or a stream's first chunk
    versions: frozenset[str]
    error: str = ""


async def _wait_ready(p: ServeProcess, timeout_s: float) -> None:
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert p.proc.poll() is None, p.log.read_text()[-4000:]
            try:
                if (await http.get(f"{p.http}/readyz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"servoloop serve did not become ready: {p.log.read_text()[-4000:]}")


@pytest.fixture
async def two_gateways(request: pytest.FixtureRequest, broker: EmbeddedBroker, tiny_model_dir: Path,
                       tmp_path: Path) -> AsyncIterator[tuple[list[ServeProcess], str, str]]:
    engine = request.param
    prefix = f"a{uuid.uuid4().hex[:10]}."
    broker.create_topics(all_topics(prefix))  # as an operator pre-creates a deployment's topics
    keys = KeyStore(tmp_path / "keys.sqlite")
    _, key = keys.create("acme", ["infer"])
    procs: list[ServeProcess] = []
    for i in range(2):
        http_port, grpc_port = _free_port(), _free_port()
        config = tmp_path / f"gw{i}.yaml"
        config.write_text(f"""
data_dir: {tmp_path / f"data{i}"}
gateway:
  host: 127.0.0.1
  http_port: {http_port}
  grpc_port: {grpc_port}
  auth: {{keys_path: {tmp_path / "keys.sqlite"}, reload_interval_s: 0.2}}
  rate_limits: {{requests_per_minute: 0, tokens_per_minute: 0, max_concurrent_streams: 0}}
  hotswap: {{drain_timeout_s: 10}}
  models:
    - {{name: tiny, engine: {engine}, path: "{tiny_model_dir}", max_concurrency: 4, max_loras: 2, max_lora_rank: 8}}
events:
  broker: {{mode: external, bootstrap_servers: "{broker.bootstrap_servers}", topic_prefix: "{prefix}"}}
""")
        log = tmp_path / f"gw{i}.log"
        env = {**os.environ, "SERVOLOOP_CONFIG": str(config), "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               # two engines on two cores: one core each, instead of both spinning OpenMP threads on both
               "VLLM_CPU_OMP_THREADS_BIND": str(i % (os.cpu_count() or 1)), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([str(BIN / "servoloop"), "serve"], env=env, stdout=log.open("ab"),
                                stderr=subprocess.STDOUT)
        procs.append(ServeProcess(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log))
    try:
        for p in procs:
            await _wait_ready(p, 240)
        yield procs, prefix, key
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.proc.wait(30)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()


async def _http_loop(i: int, gw: ServeProcess, key: str, stream: bool, stop: asyncio.Event,
                     out: list[Observed]) -> None:
    api = "http-stream" if stream else "http"
    body = {"model": "tiny", "messages": MSG, "max_tokens": 8, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60) as http:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if stream:
                    async with http.stream("POST", f"{gw.http}/v1/chat/completions", json=body, headers=headers) as r:
                        got = time.monotonic()
                        if r.status_code != 200:
                            out.append(Observed(i, api, sent, got, frozenset(), f"{r.status_code} {await r.aread()!r}"))
                            continue
                        versions = {r.headers["x-servoloop-model-version"]}
                        error = ""
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                if '"error"' in line:
                                    error = line
                                versions.add(line.split('"system_fingerprint":"')[1].split('"')[0]
                                             if '"system_fingerprint":"' in line else "?")
                        out.append(Observed(i, api, sent, got, frozenset(versions), error))
                else:
                    r = await http.post(f"{gw.http}/v1/chat/completions", json=body, headers=headers)
                    got = time.monotonic()
                    if r.status_code != 200:
                        out.append(Observed(i, api, sent, got, frozenset(), f"{r.status_code} {r.text}"))
                        continue
                    out.append(Observed(i, api, sent, got, frozenset(
                        {r.headers["x-servoloop-model-version"], r.json()["system_fingerprint"]})))
            except Exception as e:
                out.append(Observed(i, api, sent, time.monotonic(), frozenset(), f"{type(e).__name__}: {e}"))


async def _grpc_loop(i: int, gw: ServeProcess, key: str, stream: bool, stop: asyncio.Event,
                     out: list[Observed]) -> None:
    api = "grpc-stream" if stream else "grpc"
    req = pb.GenerateRequest(model="tiny", messages=[pb.ChatMessage(role="user", content=MSG[0]["content"])],
                             params=pb.SamplingParams(max_tokens=8, temperature=0))
    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(gw.grpc) as ch:
        stub = pb_grpc.InferenceStub(ch)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if stream:
                    got = None
                    versions: set[str] = set()
                    async for chunk in stub.GenerateStream(req, metadata=md, timeout=60):
                        got = got or time.monotonic()
                        versions.add(chunk.model_version)
                    out.append(Observed(i, api, sent, got or time.monotonic(), frozenset(versions)))
                else:
                    reply = await stub.Generate(req, metadata=md, timeout=60)
                    out.append(Observed(i, api, sent, time.monotonic(), frozenset({reply.model_version})))
            except Exception as e:
                out.append(Observed(i, api, sent, time.monotonic(), frozenset(), f"{type(e).__name__}: {e}"))


def _first(out: list[Observed], gateway: int, version: str, since: float) -> float | None:
    times = [o.got for o in out if o.gateway == gateway and o.sent >= since and o.versions == {version}]
    return min(times) if times else None


async def _until_both(out: list[Observed], version: str, since: float, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_first(out, g, version, since) is not None for g in (0, 1)):
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("two_gateways", ["transformers", "vllm"], indirect=True)
async def test_promote_and_rollback_reach_both_gateways_under_load_without_a_failed_request(
        two_gateways: tuple[list[ServeProcess], str, str], broker: EmbeddedBroker,
        lora_adapters: dict[str, Adapter]) -> None:
    procs, prefix, key = two_gateways
    out: list[Observed] = []
    stop = asyncio.Event()
    registry = ModelEventProducer(broker.bootstrap_servers, prefix)  # writes what the registry writes
    await registry.send([model_event("tiny", "v1", "candidate", lora_adapters["v1"])])  # registered, not served
    loops = [asyncio.create_task(loop(i, gw, key, stream, stop, out))
             for i, gw in enumerate(procs) for loop in (_http_loop, _grpc_loop) for stream in (False, True)]
    try:
        await _until_both(out, "base", 0.0)
        await asyncio.sleep(1.0)  # steady load on the base model

        promoted = time.monotonic()  # the registry's rows for `promote v1`: the base retires, v1 is active
        await registry.send([
            model_event("tiny", "base", "retired", previous="active"),
            model_event("tiny", "v1", "active", lora_adapters["v1"], previous="canary")])
        await _until_both(out, "v1", promoted)
        await asyncio.sleep(1.5)

        rolled_back = time.monotonic()  # `rollback v1`: v1 rolled back, the base re-activated
        await registry.send([
            model_event("tiny", "v1", "rolled_back", lora_adapters["v1"], previous="active"),
            model_event("tiny", "base", "active", previous="retired")])
        await _until_both(out, "base", rolled_back)
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.gather(*loops)
        await registry.aclose()

    for p in procs:  # the gateways' own account: fetch, verify, load, warm, switch
        print("\n".join(line for line in p.log.read_text().splitlines() if "hot swap" in line))
    failed = [o for o in out if o.error or not o.versions]
    assert not failed, failed[:5]
    mixed = [o for o in out if len(o.versions) != 1]
    assert not mixed, mixed[:5]  # one version per response, in every chunk of a stream
    report = {"requests": len(out), "apis": sorted({o.api for o in out})}
    for g in (0, 1):
        mine = sorted((o for o in out if o.gateway == g), key=lambda o: o.sent)
        first_v1 = _first(out, g, "v1", promoted)
        assert first_v1 is not None, f"gateway {g} never served v1"
        back = _first(out, g, "base", rolled_back)
        assert back is not None, f"gateway {g} never returned to base"
        report[f"gw{g}_promote_s"] = round(first_v1 - promoted, 3)
        report[f"gw{g}_rollback_s"] = round(back - rolled_back, 3)
        timeline = [(o.api, round(o.sent - promoted, 3), round(o.got - promoted, 3), sorted(o.versions))
                    for o in mine if -3 < o.sent - promoted < 8]
        assert first_v1 - promoted < SWITCH_WITHIN_S, timeline
        assert back - rolled_back < SWITCH_WITHIN_S
        # never backwards: before the publish only base; once v1 answered, everything sent after it is v1
        # (until the rollback), and once base answered again, everything sent after it is base
        assert all(o.versions == {"base"} for o in mine if o.got < promoted)
        assert all(o.versions == {"v1"} for o in mine if first_v1 < o.sent and o.got < rolled_back)
        assert all(o.versions == {"base"} for o in mine if o.sent > back)
        assert {o.api for o in mine if o.versions == {"v1"}} == {"http", "http-stream", "grpc", "grpc-stream"}
    print("hot swap under load:", report)
