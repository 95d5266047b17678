"""Keys, scopes and rate limits, over HTTP and gRPC, against a real upstream."""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
import httpx
import pytest

from gateway.auth import KeyStore
from gateway.limits import RateLimiter, TokenBucket, retry_after_header
from gateway.settings import RateLimitSettings
from schemas.errors import RateLimited
from schemas.pb import inference_pb2 as pb
from tests.gateway.conftest import RunningGateway

CHAT = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _post(gw: RunningGateway, key: str | None, body: dict = CHAT) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient() as http:
        return await http.post(f"{gw.http}/v1/chat/completions", json=body, headers=headers)


async def _grpc_generate(gw: RunningGateway, key: str | None, **kw: object) -> pb.GenerateResponse:
    md = (("authorization", f"Bearer {key}"),) if key else ()
    async with grpc.aio.insecure_channel(gw.grpc) as ch:
        call = ch.unary_unary("/servoloop.v1.Inference/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateResponse.FromString)
        req = pb.GenerateRequest(model="remote", messages=[pb.ChatMessage(role="user", content="hi")], **kw)
        return await call(req, metadata=md)


@pytest.mark.parametrize("key", [None, "not-a-key", "sl-000000000000-wrongsecret"])
async def test_missing_or_invalid_key_is_401_over_http(remote_gateway: RunningGateway, key: str | None) -> None:
    r = await _post(remote_gateway, key)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


async def test_revoked_key_is_refused_over_http_and_grpc(remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key()
    assert (await _post(remote_gateway, key)).status_code == 200
    key_id = key.split("-")[1]

    remote_gateway.keystore.revoke(key_id)
    remote_gateway.gw.auth.reload()

    assert (await _post(remote_gateway, key)).status_code == 401
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _grpc_generate(remote_gateway, key)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_revocation_reaches_a_running_gateway_through_the_background_reload(
        remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key()
    remote_gateway.keystore.revoke(key.split("-")[1])  # no explicit reload: the reloader picks it up
    for _ in range(60):
        if (await _post(remote_gateway, key)).status_code == 401:
            return
        await asyncio.sleep(0.1)
    pytest.fail("revoked key still accepted after 6 s")


async def test_missing_key_is_unauthenticated_over_grpc(remote_gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _grpc_generate(remote_gateway, None)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_key_without_infer_scope_is_403_and_permission_denied(remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key(scopes=["feedback"])

    r = await _post(remote_gateway, key)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _grpc_generate(remote_gateway, key)

    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_keys_are_stored_only_as_salted_hashes(tmp_path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite")
    _, key_a = store.create("t", ["infer"])
    _, key_b = store.create("t", ["infer"])
    secret_a, secret_b = key_a.split("-", 2)[2], key_b.split("-", 2)[2]

    raw = b"".join((tmp_path / f).read_bytes() for f in ("keys.sqlite", "keys.sqlite-wal") if (tmp_path / f).exists())
    salts = [r[0] for r in sqlite3.connect(tmp_path / "keys.sqlite").execute("SELECT salt FROM api_keys")]

    assert secret_a.encode() not in raw and secret_b.encode() not in raw
    assert len(set(salts)) == 2


async def test_requests_per_minute_limit_answers_429_with_retry_after(remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key(rpm=2)

    statuses = [(await _post(remote_gateway, key)).status_code for _ in range(2)]
    refused = await _post(remote_gateway, key)

    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["details"]["limit"] == "requests_per_minute"
    # 2 per minute refill one request every 30 s
    assert 29 <= int(refused.headers["retry-after"]) <= 30


async def test_tokens_per_minute_limit_is_resource_exhausted_over_grpc_with_retry_after(
        remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key(tpm=100)
    # prompt ≈ 6 tokens + max_tokens 60 reserved: the second request does not fit in the bucket
    await _grpc_generate(remote_gateway, key, params=pb.SamplingParams(max_tokens=60))
    # the upstream used only 8 tokens: the rest was given back, so two more small requests fit
    await _grpc_generate(remote_gateway, key, params=pb.SamplingParams(max_tokens=40))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _grpc_generate(remote_gateway, key, params=pb.SamplingParams(max_tokens=90))

    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(e.value.trailing_metadata())
    assert trailers["servoloop-error-code"] == "rate_limit_exceeded"
    assert int(trailers["retry-after"]) >= 1


async def test_concurrent_stream_limit_refuses_the_extra_stream(upstream, remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key(max_streams=1)
    # long enough to outlast the output guard's hold-back window, so the first stream is still open
    upstream.behaviour.token_interval_ms, upstream.behaviour.tokens = 50, 40
    try:
        body = {**CHAT, "stream": True, "max_tokens": 40}
        async with httpx.AsyncClient(timeout=10) as http:
            async with http.stream("POST", f"{remote_gateway.http}/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as first:
                assert first.status_code == 200
                second = await _post(remote_gateway, key, body)
                async for _ in first.aiter_lines():
                    pass
    finally:
        upstream.behaviour.token_interval_ms, upstream.behaviour.tokens = 0, 8
    assert second.status_code == 429
    assert second.json()["error"]["details"]["limit"] == "concurrent_streams"


def test_token_bucket_retry_after_is_exactly_the_refill_time() -> None:
    bucket = TokenBucket.per_minute(60, now=0.0)  # one per second
    bucket.take(60, now=0.0)

    assert bucket.wait_for(1, now=0.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, now=0.5) == pytest.approx(0.5)
    assert bucket.wait_for(1, now=1.0) == 0
    assert retry_after_header(0.2) == "1" and retry_after_header(29.01) == "30"


def test_a_refused_request_takes_nothing_from_any_bucket() -> None:
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=10, tokens_per_minute=100))
    limits = limiter.limits_for(None, None, None)
    limiter.admit("k", limits, 90, now=0.0)
    with pytest.raises(RateLimited) as e:
        limiter.admit("k", limits, 50, now=0.0)
    assert e.value.limit == "tokens_per_minute"
    assert e.value.retry_after_s == pytest.approx(24.0)  # 40 tokens missing at 100/min

    limiter.admit("k", limits, 10, now=0.0)  # the refused request left the 10 tokens it did not take
