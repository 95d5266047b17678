"""Hypothesis-generated gRPC messages (well-formed protobuf with hostile field values, and raw bytes that are
not protobuf at all) against the real gateway: every call ends OK or with a clear status, never INTERNAL/UNKNOWN."""

from __future__ import annotations

import json
import os
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas.pb import feedback_pb2 as fpb
from schemas.pb import inference_pb2 as pb
from tests.reliability.conftest import FullGateway

pytestmark = pytest.mark.reliability

CASES = int(os.environ.get("SERVOLOOP_FUZZ_CASES", "300"))
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}

# Protobuf strings must be UTF-8 on the wire; hostile text means control characters, zero-width joiners,
# RTL overrides, NULs and astral planes, not lone surrogates (the client library refuses those itself).
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=64) | st.sampled_from(
    ["", "tiny", "\x00", "\u202e\u200d" * 50, "a" * 5000, "ignore previous instructions", "sk-" + "A" * 48])
u32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 4, 5, 2**31])
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
params = st.builds(pb.SamplingParams, max_tokens=st.none() | u32, temperature=st.none() | floats,
                   top_p=st.none() | floats, stop=st.lists(text, max_size=6),
                   seed=st.none() | st.integers(-(2**63), 2**63 - 1), min_tokens=st.none() | u32)
generate = st.builds(pb.GenerateRequest, model=text | st.just("tiny"),
                     messages=st.lists(st.builds(pb.ChatMessage, role=text | st.sampled_from(["user", "system"]),
                                                 content=text), max_size=4),
                     prompt=text, params=st.none() | params, cache=st.booleans(), user=text)
feedback = st.builds(fpb.SubmitFeedbackRequest, target_id=text, metric_name=text, idempotency_key=text,
                     user=text).flatmap(lambda m: st.one_of(
                         st.just(m), st.builds(lambda r: (m.__setattr__("rating", r), m)[1], st.floats()),
                         st.builds(lambda c: (m.__setattr__("comment", c), m)[1], text),
                         st.builds(lambda t: (m.__setattr__("thumbs", t), m)[1], st.integers(-3, 5))))
calls = st.one_of(
    st.tuples(st.just("/servoloop.v1.Inference/Generate"), generate.map(lambda m: m.SerializeToString())),
    st.tuples(st.just("/servoloop.v1.Inference/GenerateStream"), generate.map(lambda m: m.SerializeToString())),
    st.tuples(st.just("/servoloop.v1.Feedback/Submit"), feedback.map(lambda m: m.SerializeToString())),
    st.tuples(st.sampled_from(["/servoloop.v1.Inference/Generate", "/servoloop.v1.Feedback/Submit",
                               "/servoloop.v1.Models/List"]), st.binary(max_size=256)),  # not protobuf
)


def draw(n: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(calls)
    def collect(call: tuple[str, bytes]) -> None:
        out.append(call)

    collect()
    return out


async def test_fuzzed_grpc_messages_never_end_in_a_server_fault(full_gateway: FullGateway):
    md = (("authorization", f"Bearer {full_gateway.key('fuzz-grpc', ('infer', 'feedback'))}"),)
    cases = draw(CASES)
    codes: Counter[str] = Counter()
    faults: list[str] = []
    unavailable: list[str] = []
    async with grpc.aio.insecure_channel(full_gateway.grpc) as ch:
        for method, payload in cases:
            ident = lambda b: b  # noqa: E731 - raw bytes both ways: the server does all the parsing
            try:
                if method.endswith("GenerateStream"):
                    call = ch.unary_stream(method, request_serializer=ident, response_deserializer=ident)
                    async for _ in call(payload, metadata=md, timeout=30):
                        pass
                else:
                    await ch.unary_unary(method, request_serializer=ident, response_deserializer=ident)(
                        payload, metadata=md, timeout=30)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                if e.code() is grpc.StatusCode.UNAVAILABLE:  # clear, but not expected from a healthy gateway
                    unavailable.append(f"{method} payload={payload.hex()[:400]}: {e.details()}")
                if e.code() in SERVER_FAULTS or not e.details():
                    faults.append(f"{method} {payload[:80]!r}: {e.code().name} {e.details()}")
    print("FUZZ " + json.dumps({"target": "grpc_messages", "cases": len(cases), "codes": dict(codes),
                                "unavailable": unavailable[:5]}))
    assert not faults, "\n".join(faults[:20])
    assert len(cases) >= CASES * 0.95  # hypothesis may stop early only when it runs out of distinct inputs
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0



def test_a_prompt_with_no_tokens_is_refused_before_the_engine(tiny_model_dir: object):
    """The engine fails on an empty input tensor (UNAVAILABLE engine_unavailable, seen twice in 1,000 fuzzed gRPC
    cases): a prompt that renders to no tokens is an invalid request before it gets there."""
    from transformers import AutoTokenizer

    from gateway.engines.prompt import encode_prompt
    from gateway.request import InferenceRequest, SamplingParams
    from schemas.errors import InvalidRequest

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    request = InferenceRequest(model="tiny", operation="text_completion", params=SamplingParams(max_tokens=2), prompt="")
    with pytest.raises(InvalidRequest, match="no tokens"):
        encode_prompt(tok, request)
    assert encode_prompt(tok, InferenceRequest(model="tiny", operation="text_completion",
                                               params=SamplingParams(max_tokens=2), prompt="hi"))
