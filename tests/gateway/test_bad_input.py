"""Every class of bad input gets a clear 4xx / gRPC status naming the problem; never a 500 or a hang."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.pb import inference_pb2 as pb
from tests.gateway.conftest import RunningGateway

MSG = [{"role": "user", "content": "hi"}]
CASES = [
    # (name, body, status, code, param)
    ("unknown model", {"model": "nope", "messages": MSG}, 404, "model_not_found", "model"),
    ("missing model", {"messages": MSG}, 400, "invalid_request", "model"),
    ("empty messages", {"model": "remote", "messages": []}, 400, "invalid_request", "messages"),
    ("only empty content", {"model": "remote", "messages": [{"role": "user", "content": "  "}]}, 400,
     "invalid_request", "messages"),
    ("unknown role", {"model": "remote", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request",
     "messages[0].role"),
    ("messages wrong type", {"model": "remote", "messages": "hi"}, 400, "invalid_request", "messages"),
    ("max_tokens string", {"model": "remote", "messages": MSG, "max_tokens": "5"}, 400, "invalid_request", "max_tokens"),
    ("max_tokens zero", {"model": "remote", "messages": MSG, "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
    ("max_tokens over the limit", {"model": "remote", "messages": MSG, "max_tokens": 10**6}, 400, "invalid_request",
     "max_tokens"),
    ("temperature too high", {"model": "remote", "messages": MSG, "temperature": 7}, 400, "invalid_request",
     "temperature"),
    ("top_p zero", {"model": "remote", "messages": MSG, "top_p": 0}, 400, "invalid_request", "top_p"),
    ("n above one", {"model": "remote", "messages": MSG, "n": 3}, 400, "invalid_request", "n"),
    ("too many stops", {"model": "remote", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400,
     "invalid_request", "stop"),
    ("min_tokens above max_tokens", {"model": "remote", "messages": MSG, "max_tokens": 4, "min_tokens": 5}, 400,
     "invalid_request", "min_tokens"),
    ("min_tokens negative", {"model": "remote", "messages": MSG, "min_tokens": -1}, 400, "invalid_request",
     "min_tokens"),
    ("stream not bool", {"model": "remote", "messages": MSG, "stream": "yes"}, 400, "invalid_request", "stream"),
    ("prompt too long", {"model": "remote", "messages": [{"role": "user", "content": "word " * 4000}]}, 400,
     "context_length_exceeded", "messages"),
]


@pytest.mark.parametrize(("name", "body", "status", "code", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_chat_request_gets_a_clear_openai_style_error(
        remote_gateway: RunningGateway, name: str, body: dict, status: int, code: str, param: str) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{remote_gateway.http}/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {remote_gateway.key()}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["param"] == param
    assert err["message"]


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]", b"null", b"\xff\xfe", b'{"model": "remote", "messages": [}'])
async def test_malformed_json_is_400(remote_gateway: RunningGateway, raw: bytes) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{remote_gateway.http}/v1/chat/completions", content=raw,
                            headers={"Authorization": f"Bearer {remote_gateway.key()}",
                                     "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"


async def test_oversized_body_is_413_before_it_is_read(remote_gateway: RunningGateway) -> None:
    huge = json.dumps({"model": "remote", "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{remote_gateway.http}/v1/chat/completions", content=huge,
                            headers={"Authorization": f"Bearer {remote_gateway.key()}"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


async def test_unknown_route_and_wrong_method_are_json_errors(remote_gateway: RunningGateway) -> None:
    async with httpx.AsyncClient() as http:
        missing = await http.get(f"{remote_gateway.http}/v1/nothing-here")
        wrong = await http.get(f"{remote_gateway.http}/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


async def test_bad_timeout_header_is_400(remote_gateway: RunningGateway) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{remote_gateway.http}/v1/chat/completions", json={"model": "remote", "messages": MSG},
                            headers={"Authorization": f"Bearer {remote_gateway.key()}", "X-Request-Timeout": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout"


def _grpc_call(gw: RunningGateway, key: str, raw: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(gw.grpc) as ch:
        call = ch.unary_unary("/servoloop.v1.Inference/Generate", request_serializer=None, response_deserializer=None)
        try:
            call(raw, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


GRPC_CASES = [
    ("unknown model", pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
    ("no input", pb.GenerateRequest(model="remote"), grpc.StatusCode.INVALID_ARGUMENT),
    ("both inputs", pb.GenerateRequest(model="remote", prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("max_tokens too big", pb.GenerateRequest(model="remote", prompt="x", params=pb.SamplingParams(max_tokens=10**6)),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("nan temperature", pb.GenerateRequest(model="remote", prompt="x",
                                           params=pb.SamplingParams(temperature=float("nan"))),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("bad role", pb.GenerateRequest(model="remote", messages=[pb.ChatMessage(role="x", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("name", "msg", "code"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
async def test_bad_grpc_request_gets_the_matching_status(remote_gateway: RunningGateway, name: str,
                                                         msg: pb.GenerateRequest, code: grpc.StatusCode) -> None:
    key = remote_gateway.key()
    assert await asyncio.to_thread(_grpc_call, remote_gateway, key, msg.SerializeToString()) == code


async def test_malformed_protobuf_is_invalid_argument_not_internal(remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key()
    assert await asyncio.to_thread(_grpc_call, remote_gateway, key, b"\xff\xff\xff\xff") == \
        grpc.StatusCode.INVALID_ARGUMENT


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
          "user", "servoloop", "stream_options", "max_completion_tokens"]
BODIES = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["remote", "nope", ""]) | JSON_VALUES,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bad"]) | JSON_VALUES,
                                                "content": st.text(max_size=30) | JSON_VALUES}), max_size=3)
    | JSON_VALUES,
    **{f: JSON_VALUES | st.integers(-5, 5000) for f in FIELDS[2:]},
})


async def test_http_never_answers_5xx_to_any_request_body(remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key(rpm=0, tpm=0)

    def run() -> None:
        with httpx.Client(base_url=remote_gateway.http, timeout=20,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
            @given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
            def check(body: dict, path: str) -> None:
                r = http.post(path, content=json.dumps(body, allow_nan=True))
                assert r.status_code in (200, 400, 404, 413), (body, r.status_code, r.text)
                if r.status_code != 200:
                    assert r.json()["error"]["message"]

            check()

    await asyncio.to_thread(run)


async def test_grpc_never_answers_internal_to_any_bytes(remote_gateway: RunningGateway) -> None:
    key = remote_gateway.key(rpm=0, tpm=0)

    def run() -> None:
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(raw=st.binary(max_size=200) | st.builds(
            lambda m, p, t, n: pb.GenerateRequest(model=m, prompt=p, params=pb.SamplingParams(
                temperature=t, max_tokens=n)).SerializeToString(),
            st.sampled_from(["remote", "nope", ""]), st.text(max_size=20), st.floats(width=32),
            st.integers(0, 2**32 - 1)))
        def check(raw: bytes) -> None:
            code = _grpc_call(remote_gateway, key, raw)
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), code

        check()

    await asyncio.to_thread(run)
