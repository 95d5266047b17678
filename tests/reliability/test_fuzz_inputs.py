"""Fuzzing the two other ways in: event payloads as the ingester reads them off the topics, and guardrail inputs
(huge, binary, invalid UTF-8, deeply nested JSON, hostile text) both in the policy and through the gateway."""

from __future__ import annotations

import json
import os
import random

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from feedback.store import Store
from feedback.store.writer import ingest_batch
from guardrails.policy import default_policy_set
from schemas.events import Event, encode_event
from tests.reliability.conftest import FullGateway
from tests.schemas.strategies import any_event

pytestmark = pytest.mark.reliability

# Bounded in `make test`; `benchmarks/chaos.py --fuzz` runs 1,000 per target and records the figures.
CASES = int(os.environ.get("SERVOLOOP_FUZZ_CASES", "300"))
FUZZ = settings(max_examples=CASES, deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))


def _mutate(raw: bytes, how: int, rnd: random.Random) -> bytes:
    """One corruption of a valid encoded event: truncation, a flipped byte, garbage spliced in, or not msgpack."""
    if how == 0:
        return raw[: rnd.randrange(len(raw))]
    if how == 1:
        i = rnd.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << rnd.randrange(8))]) + raw[i + 1:]
    if how == 2:
        i = rnd.randrange(len(raw))
        return raw[:i] + rnd.randbytes(rnd.randrange(1, 32)) + raw[i:]
    if how == 3:
        return json.dumps({"type": "inference", "event_id": "x" * rnd.randrange(1, 100)}).encode()
    if how == 4:
        return b"\x91" * 10_000 + b"\xc0"  # nested arrays 10k deep
    return rnd.randbytes(rnd.randrange(0, 512))


payloads = st.tuples(st.lists(any_event(), min_size=1, max_size=4), st.integers(0, 5), st.randoms(use_true_random=False))


async def test_corrupt_event_payloads_become_dead_letters_and_no_good_event_is_lost(store: Store):
    batches: list[tuple[list[Event], bytes]] = []

    @FUZZ
    @given(payloads)
    def collect(drawn: tuple[list[Event], int, random.Random]) -> None:
        good, how, rnd = drawn
        batches.append((good, _mutate(encode_event(good[0]), how, rnd)))

    collect()
    good_ids: set[str] = set()
    values: list[bytes] = []
    for good, bad in batches:
        values += [encode_event(e) for e in good] + [bad]
        good_ids |= {e.event_id for e in good}
    received = 0
    dead: set[str] = set()
    stored: set[str] = set()
    for i in range(0, len(values), 500):  # the ingester's batches: corrupt records among good ones
        chunk = values[i:i + 500]
        result = await ingest_batch(store, chunk, source=[("fuzz", 0, i + j) for j in range(len(chunk))])
        received += result.received
        dead |= {d.event_id for d in result.dead_letters}
        stored |= set(result.event_ids)
        assert all(d.reason and d.raw is not None for d in result.dead_letters)
    print("FUZZ " + json.dumps({"target": "event_payloads", "cases": len(batches), "payloads": len(values),
                                "dead_letters": len(dead), "good_lost": len(good_ids - stored)}))
    assert len(batches) >= CASES and received == len(values)
    assert good_ids <= stored  # nothing accepted is lost (a mutation that still decodes is simply stored too)
    assert 0 < len(dead) <= len(batches)
    in_table = set((await store.query("SELECT event_id FROM dead_letters FINAL")).column("event_id").to_pylist())
    assert dead <= in_table  # every refused record is kept for replay (DeadLetter events drawn as good ones too)


hostile_text = st.one_of(
    st.text(max_size=2000),
    st.binary(max_size=2000).map(lambda b: b.decode("utf-8", "surrogateescape")),  # invalid UTF-8 as surrogates
    st.text(st.sampled_from("\u200b\u200d\u202e\ufeff\u0000aA@. -_0123456789"), max_size=500),
    st.integers(1, 50_000).map(lambda n: "a" * n),
    st.integers(1, 2000).map(lambda n: "[" * n + "]" * n),
)


def test_the_guardrail_policy_answers_every_hostile_input_with_a_verdict():
    policy = default_policy_set().resolve("fuzz", "tiny")
    seen = {"n": 0}

    @FUZZ
    @given(st.lists(hostile_text, min_size=1, max_size=3), hostile_text)
    def check(inputs: list[str], output: str) -> None:
        verdict = policy.check_input(inputs)
        assert verdict.action in ("allow", "redact", "block", "flag") or verdict.blocked in (True, False)
        policy.check_output(output)
        guard = policy.stream_guard()
        for i in range(0, len(output), 97):
            guard.feed(output[i:i + 97])
            if guard.blocked:
                break
        if not guard.blocked:
            guard.finish()
        seen["n"] += 1

    check()
    print("FUZZ " + json.dumps({"target": "guardrail_inputs", "cases": seen["n"], "crashes": 0}))
    assert seen["n"] >= CASES


BAD_BODIES: list[tuple[str, bytes]] = [
    ("huge", b'{"model":"tiny","prompt":"' + b"a" * 2_000_000 + b'"}'),
    ("binary", bytes(range(256)) * 8),
    ("invalid utf-8", b'{"model":"tiny","prompt":"\xff\xfe\xc3\x28"}'),
    ("lone surrogate", b'{"model":"tiny","prompt":"\\ud800"}'),
    ("nested json", b'{"model":"tiny","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("nested messages", b'{"model":"tiny","messages":[{"role":"user","content":' + b'{"a":' * 5000 + b"1"
     + b"}" * 5000 + b"}]}"),
    ("not an object", b"[]"),
    ("empty", b""),
    ("nul", b"\x00"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/feedback"])
async def test_hostile_bodies_get_a_json_4xx_from_every_json_endpoint(full_gateway: FullGateway, path: str):
    key = full_gateway.key("fuzz-bodies", ("infer", "feedback"))
    async with httpx.AsyncClient(base_url=full_gateway.http, timeout=30,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as c:
        for name, body in BAD_BODIES:
            r = await c.post(path, content=body)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
            error = msgspec.json.decode(r.content)["error"]
            assert error["code"] and error["message"], name
        r = await c.get("/healthz")
        assert r.status_code == 200  # still serving
