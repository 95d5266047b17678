"""Fallback to a second engine when the first fails, and the exact-match response cache."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway.conftest import RunningGateway

MSG = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("model", ["failing", "dead"])
async def test_unary_falls_back_to_the_next_model_when_the_engine_fails(remote_gateway: RunningGateway,
                                                                         model: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{remote_gateway.http}/v1", api_key=remote_gateway.key(), max_retries=0)
    remote_gateway.outcomes.clear()

    r = await client.chat.completions.create(model=model, messages=MSG, max_tokens=4)

    assert r.choices[0].message.content == "w0 w1 w2 w3 "
    [outcome] = remote_gateway.outcomes
    assert outcome.status == "ok" and outcome.admission.served[-1].name == "remote"


@pytest.mark.parametrize("model", ["failing", "dead"])
async def test_stream_falls_back_before_the_first_token(remote_gateway: RunningGateway, model: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{remote_gateway.http}/v1", api_key=remote_gateway.key(), max_retries=0)

    parts = [c.choices[0].delta.content or "" async for c in await client.chat.completions.create(
        model=model, messages=MSG, max_tokens=3, stream=True) if c.choices]

    assert "".join(parts) == "w0 w1 w2 "


async def test_fallbacks_are_counted_in_metrics(remote_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{remote_gateway.http}/v1", api_key=remote_gateway.key(), max_retries=0)
    await client.chat.completions.create(model="failing", messages=MSG, max_tokens=2)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{remote_gateway.http}/metrics")).text
    assert 'servoloop_engine_fallbacks_total{fallback="remote",model="failing"}' in text


async def test_engine_down_without_fallback_is_503_with_a_clear_code(remote_gateway: RunningGateway) -> None:
    async with httpx.AsyncClient() as http:
        for stream in (False, True):
            r = await http.post(f"{remote_gateway.http}/v1/chat/completions",
                                json={"model": "dead-alone", "messages": MSG, "stream": stream},
                                headers={"Authorization": f"Bearer {remote_gateway.key()}"})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "engine_unavailable"


async def test_cache_serves_a_temperature_zero_repeat_without_calling_the_engine(
        upstream, remote_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{remote_gateway.http}/v1", api_key=remote_gateway.key(), max_retries=0)
    body = {"model": "remote", "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 4,
            "temperature": 0, "extra_body": {"servoloop": {"cache": True}}}

    first = await client.chat.completions.create(**body)
    calls = upstream.behaviour.requests
    second = await client.chat.completions.create(**body)

    assert upstream.behaviour.requests == calls
    assert second.choices[0].message.content == first.choices[0].message.content
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{remote_gateway.http}/metrics")).text
    assert 'servoloop_cache_lookups_total{result="hit"}' in text
    assert 'servoloop_cache_lookups_total{result="miss"}' in text


async def test_cache_is_not_used_when_sampling_or_not_opted_in(upstream, remote_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{remote_gateway.http}/v1", api_key=remote_gateway.key(), max_retries=0)
    sampled = {"model": "remote", "messages": [{"role": "user", "content": "sampled"}], "max_tokens": 2,
               "temperature": 0.7, "extra_body": {"servoloop": {"cache": True}}}
    not_opted = {"model": "remote", "messages": [{"role": "user", "content": "plain"}], "max_tokens": 2,
                 "temperature": 0}

    for body in (sampled, not_opted):
        before = upstream.behaviour.requests
        await client.chat.completions.create(**body)
        await client.chat.completions.create(**body)
        assert upstream.behaviour.requests == before + 2


async def test_cache_never_crosses_tenants(upstream, remote_gateway: RunningGateway) -> None:
    body = {"model": "remote", "messages": [{"role": "user", "content": "tenant-scoped"}], "max_tokens": 2,
            "temperature": 0, "extra_body": {"servoloop": {"cache": True}}}
    for tenant in ("tenant-a", "tenant-b"):
        client = openai.AsyncOpenAI(base_url=f"{remote_gateway.http}/v1", api_key=remote_gateway.key(tenant=tenant),
                                    max_retries=0)
        before = upstream.behaviour.requests
        await client.chat.completions.create(**body)
        assert upstream.behaviour.requests == before + 1


async def test_remote_engine_forwards_sampling_options_to_the_upstream(upstream, remote_gateway: RunningGateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{remote_gateway.http}/v1", api_key=remote_gateway.key(), max_retries=0)

    await client.chat.completions.create(model="remote", messages=MSG, max_tokens=6, temperature=0.5, top_p=0.9,
                                         seed=7, stop=["zz"], extra_body={"min_tokens": 3})

    body = upstream.behaviour.last_body
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (6, 0.5, 0.9, 7)
    assert body["stop"] == ["zz"] and body["min_tokens"] == 3
