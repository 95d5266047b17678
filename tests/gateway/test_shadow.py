"""Shadow routing: sampled served requests are replayed to a candidate after the client has its answer.

Real gateways over real OpenAI-protocol upstreams: `remote` answers at once; the shadow candidate answers
`SHADOW ...` after 1.5 s. The client must get the served answer only, before the shadow completes; the
shadow answer lands as an inference event flagged `shadow`, paired to the served one, and the pairwise
grader on the real store judges the pair.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from pydantic import ValidationError

from feedback.graders.settings import GraderSettings, GradingSettings
from feedback.graders.worker import GradingWorker
from feedback.monitors.runner import store_publisher
from feedback.store import Store, write_events
from gateway.auth import KeyStore
from gateway.engines import Engine
from gateway.engines.remote import RemoteEngine
from gateway.router import Arms, ModelRoute
from gateway.settings import GatewaySettings, ModelSettings, ShadowPolicy
from gateway.shadow import sampled
from schemas.events import InferenceEvent
from schemas.pb import inference_pb2 as pb
from schemas.pb import inference_pb2_grpc as pb_grpc
from tests.gateway.conftest import RunningGateway, settings_for, start_gateway
from tests.support.openai_upstream import RunningUpstream, UpstreamBehaviour

SHADOW_DELAY_S = 1.5
SHADOW_REPLY = "Sure! SHADOW answer from the candidate: write to cand@example.com today."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
async def slow_upstream() -> AsyncIterator[RunningUpstream]:
    up = await RunningUpstream(UpstreamBehaviour(reply=SHADOW_REPLY, latency_ms=SHADOW_DELAY_S * 1000)).start()
    yield up
    await up.stop()


@pytest.fixture(scope="module")
async def shadowed(keystore: KeyStore, upstream: RunningUpstream,
                   slow_upstream: RunningUpstream) -> AsyncIterator[RunningGateway]:
    """`remote` replays every request to `candidate`; `small` too, through a queue of one; `canaried` to its canary."""
    models = [ModelSettings(name="remote", engine="remote", url=upstream.url),
              ModelSettings(name="small", engine="remote", url=upstream.url),
              ModelSettings(name="canaried", engine="remote", url=upstream.url),
              ModelSettings(name="candidate", engine="remote", url=slow_upstream.url)]
    shadow = [ShadowPolicy(model="remote", target="candidate", version="v-cand", sample_rate=1.0, max_concurrency=4),
              ShadowPolicy(model="small", target="candidate", version="v-cand", sample_rate=1.0, max_concurrency=1,
                           queue_size=1),
              ShadowPolicy(model="canaried", target="canary", sample_rate=1.0)]
    engines: dict[str, Engine] = {m.name: RemoteEngine(m) for m in models}
    for e in engines.values():
        await e.start()
    running = await start_gateway(settings_for(models, shadow=shadow), keystore, engines)
    yield running
    await running.server.stop()
    for e in engines.values():
        await e.aclose()


def _inferences(running: RunningGateway) -> list[InferenceEvent]:
    return [e for e in running.events if isinstance(e, InferenceEvent)]


async def _http(running: RunningGateway, key: str, model: str, *, stream: bool) -> tuple[str, str]:
    """(inference id, the text the client got) of one chat completion over HTTP."""
    body = {"model": model, "messages": QUESTION, "max_tokens": 4, "stream": stream}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{running.http}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    if not stream:
        j = r.json()
        return j["id"], j["choices"][0]["message"]["content"]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return chunks[0]["id"], "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def _grpc(running: RunningGateway, key: str, model: str, *, stream: bool) -> tuple[str, str]:
    req = pb.GenerateRequest(model=model, messages=[pb.ChatMessage(**m) for m in QUESTION],
                             params=pb.SamplingParams(max_tokens=4))
    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(running.grpc) as ch:
        stub = pb_grpc.InferenceStub(ch)
        if stream:
            chunks = [c async for c in stub.GenerateStream(req, metadata=md)]
            return chunks[-1].id, "".join(c.text for c in chunks)
        r = await stub.Generate(req, metadata=md)
        return r.id, r.text


@pytest.mark.parametrize(("api", "stream"), [("http", False), ("http", True), ("grpc", False), ("grpc", True)])
async def test_clients_get_the_served_answer_before_the_shadow_completes_and_never_the_shadow_answer(
        shadowed: RunningGateway, api: str, stream: bool) -> None:
    key = shadowed.key()
    call = _http if api == "http" else _grpc
    started = time.monotonic()
    served_id, text = await call(shadowed, key, "remote", stream=stream)
    took = time.monotonic() - started
    # The client has its whole answer while the shadow (1.5 s upstream) has not finished: nothing waits on it.
    assert not [e for e in _inferences(shadowed) if e.shadow_of == served_id]
    assert took < SHADOW_DELAY_S, f"the client waited {took:.2f} s: the shadow is on the request path"
    assert text.startswith("w0") and "SHADOW" not in text
    assert shadowed.gw.shadow is not None
    await shadowed.gw.shadow.drain()
    events = _inferences(shadowed)
    [served] = [e for e in events if e.event_id == served_id]
    [shadow] = [e for e in events if e.shadow_of == served_id]
    assert not served.shadow and served.model_version == "base" and "SHADOW" not in served.response
    assert shadow.shadow and shadow.response.startswith("Sure! SHADOW")
    # stored as it left the request's output guardrails, like every answer
    assert "[EMAIL]" in shadow.response and "cand@example.com" not in shadow.response
    assert shadow.output_action == "redact"
    assert (shadow.model, shadow.model_version, shadow.canary_arm, shadow.status) == ("remote", "v-cand", "shadow", "ok")
    assert shadow.event_id != served_id and shadow.messages == served.messages and shadow.tenant == served.tenant
    assert shadow.latency_ms >= SHADOW_DELAY_S * 1000 * 0.9
    # a second look after the shadow finished: the client's inference id still names the served answer only
    assert not [e for e in events if e.event_id == served_id and e.shadow]


async def test_a_full_shadow_queue_drops_replays_and_counts_them_without_slowing_requests(
        shadowed: RunningGateway) -> None:
    key = shadowed.key()
    gw = shadowed.gw
    assert gw.shadow is not None
    before = gw.metrics.registry.get_sample_value("servoloop_shadow_dropped_total",
                                                  {"model": "small", "target": "candidate"}) or 0.0
    # five requests at once: one shadow replays (concurrency 1), one waits (queue_size 1), the rest are dropped
    ids = [i for i, _ in await asyncio.gather(*(_http(shadowed, key, "small", stream=False) for _ in range(5)))]
    assert not [e for e in _inferences(shadowed) if e.shadow_of in ids]  # all five answered, no shadow done yet
    dropped = gw.metrics.registry.get_sample_value("servoloop_shadow_dropped_total",
                                                   {"model": "small", "target": "candidate"}) - before
    assert dropped in (3, 4)  # 4 when the worker had not yet taken the first replay off the queue
    await gw.shadow.drain()
    shadows = [e for e in _inferences(shadowed) if e.shadow_of in ids]
    assert len(shadows) == 5 - dropped and len({e.shadow_of for e in shadows}) == len(shadows)


async def test_a_canary_target_replays_to_the_live_canary_only(shadowed: RunningGateway) -> None:
    key = shadowed.key()
    router = shadowed.gw.router
    assert shadowed.gw.shadow is not None
    await shadowed.gw.shadow.drain()
    before = len([e for e in _inferences(shadowed) if e.shadow])
    served_id, _ = await _http(shadowed, key, "canaried", stream=False)  # no canary yet: nothing to replay to
    await shadowed.gw.shadow.drain()
    assert len([e for e in _inferences(shadowed) if e.shadow]) == before
    active = router.arms("canaried").active
    canary = ModelRoute("canaried", shadowed.gw.engines["candidate"], version="v2", ready=True, arm="canary")
    router.swap("canaried", Arms(active, canary, canary_share=0.0))  # every client stays on the active arm
    try:
        served_id, text = await _http(shadowed, key, "canaried", stream=True)
        assert "SHADOW" not in text
        await shadowed.gw.shadow.drain()
        [shadow] = [e for e in _inferences(shadowed) if e.shadow_of == served_id]
        assert (shadow.model_version, shadow.response.startswith("Sure! SHADOW")) == ("v2", True)
    finally:
        router.swap("canaried", Arms(active))


async def test_shadow_pairs_are_graded_by_the_pairwise_win_rate_grader(shadowed: RunningGateway, store: Store) -> None:
    key = shadowed.key("pairs")
    served = [(await _http(shadowed, key, "remote", stream=False))[0] for _ in range(2)]
    assert shadowed.gw.shadow is not None
    await shadowed.gw.shadow.drain()
    mine = [e for e in _inferences(shadowed) if e.tenant == "pairs"]
    assert len(mine) == 4 and sum(e.shadow for e in mine) == 2
    await write_events(store, mine)
    got = await store.query("SELECT event_id, shadow, shadow_of FROM inferences FINAL WHERE shadow ORDER BY ts")
    assert set(got.column("shadow_of").to_pylist()) == set(served)  # the flag and the pairing survive the store
    settings = GradingSettings(settle_s=0, graders={"judge_pairwise": GraderSettings(sample_rate=1.0)})
    worker = GradingWorker(store, store_publisher(store), settings, graders={})
    report = await worker.run_once(only="judge_pairwise")
    shadow_of = {e.event_id: e.shadow_of for e in mine if e.shadow}
    # every shadow is judged against the very answer it replays (both asked the same question: by question
    # alone only the latest two answers would pair)
    assert sorted(g.target_id for g in report.grades) == sorted(served)
    for grade in report.grades:
        assert shadow_of[grade.other_id] == grade.target_id and grade.other_version == "v-cand"
        assert grade.label == "loss"  # "w0 w1 w2 w3" (no greeting) against a polite candidate answer
    assert (await worker.run_once(only="judge_pairwise")).grades == []  # graded once


def test_shadow_policies_must_name_configured_models_and_sampling_is_stable() -> None:
    models = [ModelSettings(name="a", engine="remote", url="http://x/v1")]
    with pytest.raises(ValidationError, match="shadow policy"):
        GatewaySettings(models=models, shadow=[ShadowPolicy(model="a", target="nope")])
    with pytest.raises(ValidationError, match="shadow policy"):
        GatewaySettings(models=models, shadow=[ShadowPolicy(model="a", target="a")])
    GatewaySettings(models=models, shadow=[ShadowPolicy(model="a")])  # canary: follows the live canary
    ids = [f"id-{i}" for i in range(4000)]
    share = sum(sampled(i, 0.25) for i in ids) / len(ids)
    assert 0.22 < share < 0.28 and [sampled(i, 0.25) for i in ids[:50]] == [sampled(i, 0.25) for i in ids[:50]]
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)



async def test_a_shadow_inference_cannot_be_rated(store: Store) -> None:
    from servoloop.up import _owns

    served = InferenceEvent(tenant="acme", model="remote", response="w0 w1")
    shadow = InferenceEvent(tenant="acme", model="remote", response="Sure!", shadow=True, shadow_of=served.event_id)
    await write_events(store, [served, shadow])
    assert await _owns(store, "acme", served.event_id)  # the ownership check behind the Feedback API
    assert not await _owns(store, "acme", shadow.event_id)
    assert not await _owns(store, "other", served.event_id)
