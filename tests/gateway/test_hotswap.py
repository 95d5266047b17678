"""Hot swap in one gateway over the real Transformers engine: model events on a real broker switch versions.

Each test has its own gateway (its own router and watcher, the session's engine) and its own topic prefix.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback.broker import EmbeddedBroker
from gateway.auth import KeyStore
from gateway.canary import CANARY, choose_arm, sticky_key
from gateway.engines import Engine
from gateway.settings import CacheSettings, HotSwapSettings, ModelSettings
from schemas.artifacts import tree_sha256
from schemas.events import InferenceEvent
from schemas.topics import topic_name
from tests.gateway.conftest import RunningGateway, settings_for
from tests.gateway.hotswap_support import Adapter, model_event, publish

MSG = [{"role": "user", "content": "Tell me a story about a robot."}]


@pytest.fixture
async def swap_gateway(keystore: KeyStore, tiny_model_dir: Path, transformers_engine: Engine, broker: EmbeddedBroker,
                       tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, str]]:
    prefix = f"h{uuid.uuid4().hex[:10]}."
    settings = settings_for([ModelSettings(name="tiny", path=str(tiny_model_dir))],
                            hotswap=HotSwapSettings(drain_timeout_s=5.0, retry_interval_s=0.5), cache=CacheSettings(enabled=True))
    from gateway.server import Gateway, GatewayServer

    events: list = []
    gw = Gateway(settings, keystore, engines={"tiny": transformers_engine},
                 events=type("P", (), {"publish": staticmethod(events.append)})())
    gw.follow_models(cache_dir=tmp_path / "adapters", bootstrap_servers=broker.bootstrap_servers,
                     topic=topic_name("models", prefix))
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    running = RunningGateway(server, keystore, events=events)
    yield running, prefix
    await server.stop()
    for name in list(getattr(transformers_engine, "_adapters", {})):  # leave the shared engine as it was
        await transformers_engine.unload_adapter(name)


async def ask(gw: RunningGateway, key: str, *, user: str | None = None, session: str | None = None,
              cache: bool = False, max_tokens: int = 12) -> tuple[str, str]:
    """(version the response reports, its text), over HTTP at temperature 0."""
    headers = {"Authorization": f"Bearer {key}", **({"x-servoloop-session": session} if session else {})}
    body = {"model": "tiny", "messages": MSG, "max_tokens": max_tokens, "temperature": 0,
            **({"user": user} if user else {}), **({"servoloop": {"cache": True}} if cache else {})}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{gw.http}/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["system_fingerprint"] == r.headers["x-servoloop-model-version"]
    return r.headers["x-servoloop-model-version"], data["choices"][0]["message"]["content"]


async def until_version(gw: RunningGateway, key: str, version: str, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if (await ask(gw, key, max_tokens=1))[0] == version:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway did not switch to {version} within {timeout_s} s: {gw.gw.readiness()}")


async def test_promote_serves_the_adapter_and_rollback_restores_the_base(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter]) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    version, base_text = await ask(gw, key)
    assert version == "base"

    await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v1", "active", lora_adapters["v1"],
                                                                 previous="candidate")])
    took = await until_version(gw, key, "v1")
    version, v1_text = await ask(gw, key)
    assert version == "v1" and v1_text != base_text
    assert took < 2.0
    inference = [e for e in gw.events if isinstance(e, InferenceEvent)][-1]
    assert (inference.model_version, inference.adapter, inference.canary_arm) == ("v1", "v1", "active")

    await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v1", "rolled_back", lora_adapters["v1"],
                                                                 previous="active"),
                                                     model_event("tiny", "v0", "active", previous="retired")])
    await until_version(gw, key, "v0")
    version, text = await ask(gw, key)
    assert (version, text) == ("v0", base_text)  # the base model again: same greedy answer
    status = gw.gw.readiness()["hotswap"]
    assert status["state"] == "running" and status["models"]["tiny"] == {"active": "v0"} and status["swaps"] == 2
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gw.http}/metrics")).text
    assert 'servoloop_model_swaps_total{model="tiny",outcome="ok"} 2.0' in metrics
    assert 'servoloop_model_version_info{arm="active",model="tiny",version="v0"} 1.0' in metrics
    assert 'version="v1"' not in metrics.split("servoloop_model_version_info")[-1]
    for _ in range(100):  # the rolled-back adapter is unloaded once drained
        if "v1" not in transformers_adapters(gw):
            break
        await asyncio.sleep(0.05)
    assert "v1" not in transformers_adapters(gw)


def transformers_adapters(gw: RunningGateway) -> dict[str, str]:
    return dict(gw.gw.engines["tiny"]._adapters)  # type: ignore[attr-defined]


async def test_a_tampered_artifact_is_refused_and_the_serving_version_stays(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter],
        tmp_path: Path) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v1", "active", lora_adapters["v1"])])
    await until_version(gw, key, "v1")
    tampered = tmp_path / "v2-tampered"
    shutil.copytree(lora_adapters["v2"].path, tampered)
    announced = tree_sha256(tampered)
    weights = tampered / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte after the hash was announced
    weights.write_bytes(bytes(data))

    await publish(broker.bootstrap_servers, prefix, [
        model_event("tiny", "v2", "active", Adapter(tampered, announced))])
    for _ in range(100):
        if gw.gw.readiness()["hotswap"]["failures"]:
            break
        await asyncio.sleep(0.05)
    status = gw.gw.readiness()["hotswap"]
    assert status["failures"] == 1 and "artifact_mismatch" in status["last_error"]
    assert status["models"]["tiny"] == {"active": "v1"}
    for _ in range(5):
        assert (await ask(gw, key, max_tokens=2))[0] == "v1"
    await asyncio.sleep(1.0)  # past the retry interval: a mismatch is never tried again
    assert gw.gw.readiness()["hotswap"]["failures"] == 1
    assert "v2" not in transformers_adapters(gw)
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gw.http}/metrics")).text
    assert 'servoloop_model_swaps_total{model="tiny",outcome="artifact_mismatch"} 1.0' in metrics


async def test_canary_share_is_sticky_per_user_and_session(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter]) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    await publish(broker.bootstrap_servers, prefix, [
        model_event("tiny", "v1", "active", lora_adapters["v1"]),
        model_event("tiny", "v2", "canary", lora_adapters["v2"], share=0.5, previous="candidate")])
    for _ in range(200):
        if gw.gw.readiness()["hotswap"]["models"]["tiny"].get("canary") == "v2":
            break
        await asyncio.sleep(0.05)
    users = [f"user-{i}" for i in range(16)]
    seen: dict[str, set[str]] = {u: set() for u in users}
    for _ in range(2):
        for u in users:
            seen[u].add((await ask(gw, key, user=u, max_tokens=1))[0])
    for u in users:
        want = "v2" if choose_arm("tiny", sticky_key(user=u), 0.5) == CANARY else "v1"
        assert seen[u] == {want}, u
    assert {v for s in seen.values() for v in s} == {"v1", "v2"}
    # a session id wins over the user id
    session = next(f"s{i}" for i in range(100) if choose_arm("tiny", sticky_key(session=f"s{i}"), 0.5) == CANARY)
    for u in users[:4]:
        assert (await ask(gw, key, user=u, session=session, max_tokens=1))[0] == "v2"
    arms = {(e.model_version, e.canary_arm) for e in gw.events if isinstance(e, InferenceEvent)}
    assert arms == {("v1", "active"), ("v2", "canary")}


async def test_cached_answers_of_an_old_version_are_not_served_after_a_swap(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter]) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    first = await ask(gw, key, cache=True)
    assert await ask(gw, key, cache=True) == first  # a cache hit
    await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v1", "active", lora_adapters["v1"])])
    await until_version(gw, key, "v1")
    after = await ask(gw, key, cache=True)
    assert after[0] == "v1" and after[1] != first[1]


async def test_a_stream_in_flight_finishes_on_the_version_it_started_with(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter]) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v1", "active", lora_adapters["v1"])])
    await until_version(gw, key, "v1")
    body = {"model": "tiny", "messages": MSG, "max_tokens": 200, "min_tokens": 200, "temperature": 0,
            "stream": True}
    fingerprints: set[str] = set()
    async with httpx.AsyncClient(timeout=60) as http, http.stream(
            "POST", f"{gw.http}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.headers["x-servoloop-model-version"] == "v1"
        lines = r.aiter_lines()
        async for line in lines:
            if line.startswith("data: {"):
                break
        await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v2", "active", lora_adapters["v2"]),
                                                         model_event("tiny", "v1", "retired", lora_adapters["v1"])])
        async for line in lines:
            if line.startswith("data: {"):
                fingerprints.add(line.split('"system_fingerprint":"')[1].split('"')[0])
            assert "error" not in line
    assert fingerprints == {"v1"}
    await until_version(gw, key, "v2")  # loading v2 waited for the stream: one engine, one adapter at a time
    for _ in range(100):
        if "v1" not in transformers_adapters(gw):
            break
        await asyncio.sleep(0.05)
    assert set(transformers_adapters(gw)) == {"v2"}


async def test_concurrent_base_requests_beside_a_loaded_adapter_all_get_the_base_answer(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter]) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    _, base_text = await ask(gw, key, max_tokens=40)
    await publish(broker.bootstrap_servers, prefix, [
        model_event("tiny", "v1", "canary", lora_adapters["v1"], share=0.5)])
    for _ in range(200):
        if gw.gw.readiness()["hotswap"]["models"]["tiny"].get("canary") == "v1":
            break
        await asyncio.sleep(0.05)
    users = [u for u in (f"user-{i}" for i in range(100)) if choose_arm("tiny", sticky_key(user=u), 0.5) != CANARY]
    canary_users = [u for u in (f"user-{i}" for i in range(100)) if u not in users]
    # Short and long base requests overlap, a short one first: it finishes while the long ones still generate
    # (with PEFT's per-request `disable_adapter()`, its exit switched the adapter back on under them).
    short = [ask(gw, key, user=u, max_tokens=3) for u in users[:2]]
    long = [ask(gw, key, user=u, max_tokens=40) for u in users[2:4]]
    answers = await asyncio.gather(*short, *long)
    assert all(v == "base" for v, _ in answers[:2])
    assert answers[2:] == [("base", base_text)] * 2
    canary = await asyncio.gather(*(ask(gw, key, user=u, max_tokens=40) for u in canary_users[:2]))
    assert all(v == "v1" and t != base_text for v, t in canary)


async def test_grpc_session_metadata_picks_the_arm_like_the_http_header(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter]) -> None:
    import grpc

    from schemas.pb import inference_pb2 as pb
    from schemas.pb import inference_pb2_grpc as pb_grpc

    gw, prefix = swap_gateway
    key = gw.key()
    await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v2", "canary", lora_adapters["v2"],
                                                                 share=0.3)])
    for _ in range(200):
        if gw.gw.readiness()["hotswap"]["models"]["tiny"].get("canary") == "v2":
            break
        await asyncio.sleep(0.05)
    sessions = [f"sess-{i}" for i in range(12)]
    req = pb.GenerateRequest(model="tiny", prompt="Hello", params=pb.SamplingParams(max_tokens=1, temperature=0))
    async with grpc.aio.insecure_channel(gw.grpc) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for s in sessions:
            md = (("authorization", f"Bearer {key}"), ("x-servoloop-session", s))
            unary = await stub.Generate(req, metadata=md)
            streamed = {c.model_version async for c in stub.GenerateStream(req, metadata=md)}
            http_version, _ = await ask(gw, key, session=s, max_tokens=1)
            want = "v2" if choose_arm("tiny", sticky_key(session=s), 0.3) == CANARY else "base"
            assert (unary.model_version, streamed, http_version) == (want, {want}, want), s


async def test_an_old_adapter_is_unloaded_only_after_its_requests_drained(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter]) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v1", "active", lora_adapters["v1"])])
    await until_version(gw, key, "v1")
    router = gw.gw.router
    held = router.arms("tiny").active  # an admitted v1 request that has not finished yet
    router.hold(held)
    try:
        await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v2", "active", lora_adapters["v2"])])
        await until_version(gw, key, "v2")
        await asyncio.sleep(0.5)
        assert set(transformers_adapters(gw)) == {"v1", "v2"}  # still loaded: a request uses it
    finally:
        router.release(held)
    for _ in range(100):
        if "v1" not in transformers_adapters(gw):
            break
        await asyncio.sleep(0.05)
    assert set(transformers_adapters(gw)) == {"v2"}


async def test_a_version_whose_artifact_is_not_there_yet_is_retried_until_it_loads(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker, lora_adapters: dict[str, Adapter],
        tmp_path: Path) -> None:
    gw, prefix = swap_gateway
    key = gw.key()
    late = tmp_path / "uploaded-later"
    await publish(broker.bootstrap_servers, prefix, [
        model_event("tiny", "v1", "active", Adapter(late, lora_adapters["v1"].sha256))])
    for _ in range(100):
        if gw.gw.readiness()["hotswap"]["failures"]:
            break
        await asyncio.sleep(0.05)
    assert (await ask(gw, key, max_tokens=1))[0] == "base"  # not there: the base keeps serving
    shutil.copytree(lora_adapters["v1"].path, late)
    await until_version(gw, key, "v1", timeout_s=5.0)


async def test_a_gateway_started_later_replays_the_topic_and_serves_the_current_version_from_its_first_request(
        keystore: KeyStore, tiny_model_dir: Path, transformers_engine: Engine, broker: EmbeddedBroker,
        lora_adapters: dict[str, Adapter], tmp_path: Path) -> None:
    from gateway.server import Gateway, GatewayServer

    prefix = f"r{uuid.uuid4().hex[:10]}."
    await publish(broker.bootstrap_servers, prefix, [
        model_event("tiny", "v1", "candidate", lora_adapters["v1"]),
        model_event("tiny", "v1", "active", lora_adapters["v1"]),
        model_event("tiny", "v2", "candidate", lora_adapters["v2"]),
        model_event("tiny", "v2", "canary", lora_adapters["v2"], share=0.25),
        model_event("tiny", "v2", "rolled_back", lora_adapters["v2"])])
    gw = Gateway(settings_for([ModelSettings(name="tiny", path=str(tiny_model_dir))]), keystore,
                 engines={"tiny": transformers_engine})
    gw.follow_models(cache_dir=tmp_path / "adapters", bootstrap_servers=broker.bootstrap_servers,
                     topic=topic_name("models", prefix))
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    try:
        running = RunningGateway(server, keystore)
        assert (await ask(running, running.key(), max_tokens=1))[0] == "v1"
        status = gw.readiness()["hotswap"]
        assert status["synced"] and status["events"] == 5 and status["models"]["tiny"] == {"active": "v1"}
        assert set(transformers_adapters(running)) == {"v1"}  # the rolled-back canary was never loaded
    finally:
        await server.stop()
        for name in list(getattr(transformers_engine, "_adapters", {})):
            await transformers_engine.unload_adapter(name)


async def test_vllm_serves_the_new_version_while_a_stream_finishes_on_the_old_adapters_weights(
        keystore: KeyStore, tiny_model_dir: Path, vllm_engine: Engine, broker: EmbeddedBroker,
        lora_adapters: dict[str, Adapter], tmp_path: Path) -> None:
    """vLLM runs both adapters at once: the swap happens mid-stream, and the stream's text is still exactly v1's."""
    from gateway.server import Gateway, GatewayServer

    prefix = f"v{uuid.uuid4().hex[:10]}."
    gw = Gateway(settings_for([ModelSettings(name="tiny", path=str(tiny_model_dir))],
                              hotswap=HotSwapSettings(drain_timeout_s=30.0)), keystore, engines={"tiny": vllm_engine})
    gw.follow_models(cache_dir=tmp_path / "adapters", bootstrap_servers=broker.bootstrap_servers,
                     topic=topic_name("models", prefix))
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    running = RunningGateway(server, keystore)
    key = running.key()
    adapters = vllm_engine._adapters  # type: ignore[attr-defined]
    try:
        await publish(broker.bootstrap_servers, prefix, [model_event("tiny", "v1", "active", lora_adapters["v1"])])
        await until_version(running, key, "v1")
        body = {"model": "tiny", "messages": MSG, "max_tokens": 64, "min_tokens": 64, "temperature": 0}
        async with httpx.AsyncClient(timeout=60) as http:
            unary = await http.post(f"{running.http}/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {key}"})
        assert unary.headers["x-servoloop-model-version"] == "v1"
        reference = unary.json()["choices"][0]["message"]["content"]  # v1's greedy answer
        body["stream"] = True
        parts: list[str] = []
        fingerprints: set[str] = set()
        async with httpx.AsyncClient(timeout=60) as http, http.stream(
                "POST", f"{running.http}/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {key}"}) as r:
            lines = r.aiter_lines()

            async def read(until_first: bool) -> None:
                async for line in lines:
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        fingerprints.add(chunk["system_fingerprint"])
                        parts.append(chunk["choices"][0]["delta"].get("content") or "")
                        if until_first:
                            return

            await read(until_first=True)
            await publish(broker.bootstrap_servers, prefix, [
                model_event("tiny", "v2", "active", lora_adapters["v2"]),
                model_event("tiny", "v1", "retired", lora_adapters["v1"])])
            rest = asyncio.create_task(read(until_first=False))
            await until_version(running, key, "v2")
            assert not rest.done(), "the stream ended before the swap: make it longer"
            assert set(adapters) == {"v1", "v2"}  # v1 stays loaded while the stream uses it
            await rest
        assert fingerprints == {"v1"} and "".join(parts) == reference
        for _ in range(100):
            if "v1" not in adapters:
                break
            await asyncio.sleep(0.05)
        assert set(adapters) == {"v2"}
    finally:
        await server.stop()
        for name in list(adapters):
            await vllm_engine.unload_adapter(name)
