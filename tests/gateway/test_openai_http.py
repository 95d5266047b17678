"""The OpenAI-compatible HTTP API, driven by the official `openai` client, over both local engines."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.gateway.conftest import RunningGateway

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def _client(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.http}/v1", api_key=key, max_retries=0)


async def test_openai_sync_client_gets_a_chat_completion(local_gateway: RunningGateway) -> None:
    client = _client(local_gateway, local_gateway.key())

    r = await asyncio.to_thread(client.chat.completions.create, model="tiny", messages=HELLO, max_tokens=16,
                                temperature=0)

    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_openai_streaming_client_gets_the_same_text_as_unary(local_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{local_gateway.http}/v1", api_key=local_gateway.key(), max_retries=0)

    unary = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    stream = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage

    assert "".join(parts) == unary.choices[0].message.content
    assert finish == unary.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == unary.usage.completion_tokens


async def test_text_completions_unary_and_streaming(local_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{local_gateway.http}/v1", api_key=local_gateway.key(), max_retries=0)

    unary = await client.completions.create(model="tiny", prompt="The weather today is", max_tokens=12, temperature=0)
    streamed = [c.choices[0].text async for c in await client.completions.create(
        model="tiny", prompt="The weather today is", max_tokens=12, temperature=0, stream=True)]

    assert unary.object == "text_completion"
    assert unary.choices[0].text
    assert "".join(streamed) == unary.choices[0].text


async def test_min_tokens_keeps_the_answer_going_past_its_natural_end(local_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{local_gateway.http}/v1", api_key=local_gateway.key(), max_retries=0)
    free = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=64, temperature=0)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 40  # the premise

    long = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=48, temperature=0,
                                                extra_body={"min_tokens": 48})

    assert long.usage.completion_tokens == 48
    assert long.choices[0].finish_reason == "length"


async def test_models_list_names_the_served_models(local_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{local_gateway.http}/v1", api_key=local_gateway.key(), max_retries=0)

    models = await client.models.list()

    assert [m.id for m in models.data] == ["tiny"]


async def test_stop_sequences_end_the_answer_before_the_stop_text(local_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{local_gateway.http}/v1", api_key=local_gateway.key(), max_retries=0)
    free = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=32, temperature=0)
    text = free.choices[0].message.content
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:2]

    stopped = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=32, temperature=0,
                                                   stop=[stop])

    assert stop not in stopped.choices[0].message.content
    assert text.startswith(stopped.choices[0].message.content)
    assert stopped.choices[0].finish_reason == "stop"


async def test_cancelling_a_stream_stops_generation_in_the_engine(local_gateway: RunningGateway) -> None:
    key = local_gateway.key()
    local_gateway.outcomes.clear()
    # long prose, abandoned at its first event: far from its end
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 1.0, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{local_gateway.http}/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status_code == 200
            got = 0
            async for line in resp.aiter_lines():
                got += line.startswith("data:")
                if got >= 1:
                    break  # the client goes away after the first event

    for _ in range(200):
        if local_gateway.outcomes:
            break
        await asyncio.sleep(0.05)
    [outcome] = local_gateway.outcomes
    assert outcome.status == "cancelled"
    assert outcome.finish_reason is None  # the engine never reached max_tokens: it was stopped


async def test_response_carries_inference_id_and_model_version_headers(local_gateway: RunningGateway) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{local_gateway.http}/v1/chat/completions",
                            json={"model": "tiny", "messages": HELLO, "max_tokens": 4},
                            headers={"Authorization": f"Bearer {local_gateway.key()}"})

    assert r.status_code == 200
    assert r.headers["x-servoloop-inference-id"] == r.json()["id"]
    assert r.headers["x-servoloop-model-version"] == "base"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_and_readiness(local_gateway: RunningGateway, path: str) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(local_gateway.http + path)
    assert r.status_code == 200


async def test_metrics_expose_requests_latency_ttft_and_tokens_per_model_and_tenant(
        local_gateway: RunningGateway) -> None:
    key = local_gateway.key(tenant="metrics-tenant")
    client = openai.AsyncOpenAI(base_url=f"{local_gateway.http}/v1", api_key=key, max_retries=0)
    await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    async for _ in await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, stream=True):
        pass

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{local_gateway.http}/metrics")).text

    assert 'servoloop_requests_total{api="http",model="tiny",status="ok",tenant="metrics-tenant"} 2.0' in text
    assert 'servoloop_request_latency_seconds_count{model="tiny",tenant="metrics-tenant"} 2.0' in text
    assert 'servoloop_time_to_first_token_seconds_count{model="tiny",tenant="metrics-tenant"}' in text
    assert 'servoloop_tokens_total{direction="out",model="tiny",tenant="metrics-tenant"}' in text
