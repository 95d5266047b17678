"""The Feedback API over HTTP and gRPC: every kind lands as a FeedbackEvent, tenants rate only their own
inferences, idempotency keys replay or conflict, and every bad input gets a clear error naming the field."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
import uuid_utils

from gateway.auth import KeyStore, Principal
from gateway.engines.remote import RemoteEngine
from gateway.feedback import (
    FeedbackService,
    FeedbackSubmission,
    FeedbackUnavailable,
    InferenceOwners,
    idempotent_event_id,
    uuid7_ms,
)
from gateway.limits import KeyLimits, RateLimiter
from gateway.settings import FeedbackSettings, ModelSettings, RateLimitSettings
from schemas.errors import Conflict, NotFound, PermissionDenied
from schemas.events import FeedbackEvent, new_event_id
from schemas.pb import feedback_pb2 as fpb
from schemas.pb import feedback_pb2_grpc as fpb_grpc
from schemas.pb import inference_pb2 as pb
from schemas.pb import inference_pb2_grpc as pb_grpc
from tests.gateway.conftest import RunningGateway, settings_for, start_gateway
from tests.support.openai_upstream import RunningUpstream

GRACE_S = 0.6  # short ingestion grace, so 404s for fresh ids come quickly here


@pytest.fixture(scope="module")
async def fb_gateway(keystore: KeyStore, upstream: RunningUpstream) -> AsyncIterator[RunningGateway]:
    """A gateway over the real OpenAI-protocol upstream, with a short ingestion grace and small limits."""
    model = ModelSettings(name="remote", engine="remote", url=upstream.url)
    engine = RemoteEngine(model)
    await engine.start()
    settings = settings_for([model], feedback=FeedbackSettings(
        ingest_grace_s=GRACE_S, recheck_interval_s=0.05, max_comment_chars=100, max_correction_chars=200,
        rating_min=0, rating_max=5, max_body_bytes=4096))
    running = await start_gateway(settings, keystore, {"remote": engine})
    yield running
    await running.server.stop()
    await engine.aclose()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def infer_http(running: RunningGateway, key: str) -> str:
    """A real inference through the gateway; returns its id (the one clients rate)."""
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{running.http}/v1/chat/completions", headers=_auth(key),
                            json={"model": "remote", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-servoloop-inference-id"] == r.json()["id"]
    return r.json()["id"]


async def infer_grpc(running: RunningGateway, key: str) -> str:
    async with grpc.aio.insecure_channel(running.grpc) as ch:
        r = await pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(model="remote", prompt="hi"),
                                                     metadata=_md(key))
    return r.id


async def post_feedback(running: RunningGateway, key: str | None, body: Any, **headers: str) -> httpx.Response:
    h = {**(_auth(key) if key else {}), **headers}
    async with httpx.AsyncClient() as http:
        if isinstance(body, bytes):
            return await http.post(f"{running.http}/v1/feedback", headers={**h, "Content-Type": "application/json"},
                                   content=body)
        return await http.post(f"{running.http}/v1/feedback", headers=h, json=body)


async def submit_grpc(running: RunningGateway, key: str | None, req: fpb.SubmitFeedbackRequest | bytes,
                      ) -> fpb.SubmitFeedbackResponse:
    async with grpc.aio.insecure_channel(running.grpc) as ch:
        if isinstance(req, bytes):
            call = ch.unary_unary("/servoloop.v1.Feedback/Submit", request_serializer=lambda b: b,
                                  response_deserializer=fpb.SubmitFeedbackResponse.FromString)
            return await call(req, metadata=_md(key) if key else None)
        return await fpb_grpc.FeedbackStub(ch).Submit(req, metadata=_md(key) if key else None)


def feedback_events(running: RunningGateway, event_id: str | None = None) -> list[FeedbackEvent]:
    return [e for e in running.events if isinstance(e, FeedbackEvent) and (event_id is None or e.event_id == event_id)]


def _trailer(err: grpc.aio.AioRpcError, name: str) -> str | None:
    return dict(err.trailing_metadata() or ()).get(name)


# --- every kind, both transports -------------------------------------------------------------------------

KINDS = ["thumbs_up", "thumbs_down", "rating", "comment", "correction", "preference"]


def _http_body(kind: str, target: str, other: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request body, the FeedbackEvent fields it must become)."""
    return {
        "thumbs_up": ({"thumbs": "up"}, {"kind": "thumbs", "thumbs": True, "metric_name": "thumbs"}),
        "thumbs_down": ({"thumbs": False, "metric_name": "helpful"},
                        {"kind": "thumbs", "thumbs": False, "metric_name": "helpful"}),
        "rating": ({"rating": 4.5, "metric_name": "stars"}, {"kind": "rating", "rating": 4.5, "metric_name": "stars"}),
        "comment": ({"comment": "too terse", "user": "u-7"}, {"kind": "comment", "comment": "too terse", "user": "u-7"}),
        "correction": ({"correction": "Paris."}, {"kind": "correction", "correction": "Paris.",
                                                   "metric_name": "correction"}),
        "preference": ({"preference": {"preferred_id": other, "other_id": target}},
                       {"kind": "preference", "preferred_id": other, "other_id": target}),
    }[kind]


def _grpc_request(kind: str, target: str, other: str) -> tuple[fpb.SubmitFeedbackRequest, dict[str, Any]]:
    body, expected = _http_body(kind, target, other)
    req = fpb.SubmitFeedbackRequest(target_id=target, metric_name=body.get("metric_name", ""), user=body.get("user", ""))
    if kind.startswith("thumbs"):
        req.thumbs = fpb.THUMBS_UP if expected["thumbs"] else fpb.THUMBS_DOWN
    elif kind == "rating":
        req.rating = body["rating"]
    elif kind == "comment":
        req.comment = body["comment"]
    elif kind == "correction":
        req.correction = body["correction"]
    else:
        req.preference.CopyFrom(fpb.Preference(preferred_id=other, other_id=target))
    return req, expected


def _assert_event(event: FeedbackEvent, key_tenant: str, target: str, expected: dict[str, Any]) -> None:
    assert event.tenant == key_tenant and event.target_id == target and event.key_id
    for name, value in expected.items():
        assert getattr(event, name) == value, name
    unset = {"thumbs": None, "rating": None, "comment": "", "correction": "", "preferred_id": "", "other_id": ""}
    for name, empty in unset.items():
        if name not in expected:
            assert getattr(event, name) == empty, name


@pytest.mark.parametrize("kind", KINDS)
async def test_every_kind_over_http_lands_as_a_feedback_event(fb_gateway: RunningGateway, kind: str) -> None:
    key = fb_gateway.key(tenant="acme")
    target, other = await infer_http(fb_gateway, key), await infer_http(fb_gateway, key)
    body, expected = _http_body(kind, target, other)

    r = await post_feedback(fb_gateway, key, {"target_id": target, **body})

    assert r.status_code == 201, r.text
    assert r.json()["status"] == "accepted"
    [event] = feedback_events(fb_gateway, r.json()["id"])
    _assert_event(event, "acme", target, expected)
    assert uuid.UUID(event.event_id).version == 7  # no idempotency key: a fresh, time-ordered id


@pytest.mark.parametrize("kind", KINDS)
async def test_every_kind_over_grpc_lands_as_a_feedback_event(fb_gateway: RunningGateway, kind: str) -> None:
    key = fb_gateway.key(tenant="acme")
    target, other = await infer_grpc(fb_gateway, key), await infer_grpc(fb_gateway, key)
    req, expected = _grpc_request(kind, target, other)

    r = await submit_grpc(fb_gateway, key, req)

    assert not r.replayed
    [event] = feedback_events(fb_gateway, r.id)
    _assert_event(event, "acme", target, expected)


async def test_feedback_observers_get_each_accepted_event_and_cannot_fail_it(fb_gateway: RunningGateway) -> None:
    key = fb_gateway.key()
    seen: list[FeedbackEvent] = []

    def broken(event: FeedbackEvent) -> None:
        raise RuntimeError("observer bug")

    fb_gateway.gw.feedback_observers.extend([broken, seen.append])
    try:
        target = await infer_http(fb_gateway, key)
        r = await post_feedback(fb_gateway, key, {"target_id": target, "rating": 3})
        bad = await post_feedback(fb_gateway, key, {"target_id": target, "rating": 9})
    finally:
        fb_gateway.gw.feedback_observers[:] = []
    assert r.status_code == 201 and bad.status_code == 400
    assert [e.event_id for e in seen] == [r.json()["id"]]
    assert seen[0] == feedback_events(fb_gateway, r.json()["id"])[0]


# --- tenant isolation ------------------------------------------------------------------------------------

async def test_a_tenant_cannot_rate_another_tenants_inference_over_http(fb_gateway: RunningGateway) -> None:
    key_a, key_b = fb_gateway.key(tenant="tenant-a"), fb_gateway.key(tenant="tenant-b")
    theirs, mine = await infer_http(fb_gateway, key_a), await infer_http(fb_gateway, key_b)
    unknown = new_event_id()
    before = len(feedback_events(fb_gateway))

    foreign = await post_feedback(fb_gateway, key_b, {"target_id": theirs, "thumbs": "down"})
    missing = await post_feedback(fb_gateway, key_b, {"target_id": unknown, "thumbs": "down"})
    pref = await post_feedback(fb_gateway, key_b, {"target_id": mine,
                                                   "preference": {"preferred_id": mine, "other_id": theirs}})

    assert foreign.status_code == missing.status_code == pref.status_code == 404
    # The same answer for another tenant's id and an id that does not exist: no existence oracle.
    assert foreign.json()["error"] == {**missing.json()["error"],
                                       "message": missing.json()["error"]["message"].replace(unknown, theirs)}
    assert foreign.json()["error"]["code"] == "not_found" and foreign.json()["error"]["param"] == "target_id"
    assert pref.json()["error"]["param"] == "preference.other_id"
    assert len(feedback_events(fb_gateway)) == before
    # The owner can rate it.
    assert (await post_feedback(fb_gateway, key_a, {"target_id": theirs, "thumbs": "up"})).status_code == 201


async def test_a_tenant_cannot_rate_another_tenants_inference_over_grpc(fb_gateway: RunningGateway) -> None:
    key_a, key_b = fb_gateway.key(tenant="tenant-a"), fb_gateway.key(tenant="tenant-b")
    theirs, mine = await infer_grpc(fb_gateway, key_a), await infer_grpc(fb_gateway, key_b)
    before = len(feedback_events(fb_gateway))
    requests = [
        fpb.SubmitFeedbackRequest(target_id=theirs, rating=5),
        fpb.SubmitFeedbackRequest(target_id=mine, preference=fpb.Preference(preferred_id=theirs, other_id=mine)),
    ]
    for req, param in zip(requests, ["target_id", "preference.preferred_id"], strict=True):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await submit_grpc(fb_gateway, key_b, req)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert _trailer(e.value, "servoloop-error-param") == param
    assert len(feedback_events(fb_gateway)) == before


async def test_foreign_and_unknown_ids_both_wait_out_the_ingestion_grace(fb_gateway: RunningGateway) -> None:
    """A 404's timing does not tell another tenant's fresh inference from an id nobody has seen."""
    key_a, key_b = fb_gateway.key(tenant="tenant-a"), fb_gateway.key(tenant="tenant-b")
    took = []
    for target in (await infer_http(fb_gateway, key_a), None):
        target = target or new_event_id()  # as fresh as the other tenant's inference
        start = time.monotonic()
        r = await post_feedback(fb_gateway, key_b, {"target_id": target, "thumbs": "up"})
        took.append(time.monotonic() - start)
        assert r.status_code == 404
    assert min(took) > GRACE_S / 2



async def test_grpcurl_submits_feedback_through_reflection(fb_gateway: RunningGateway) -> None:
    key = fb_gateway.key()
    target = await infer_grpc(fb_gateway, key)
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    body = json.dumps({"targetId": target, "metricName": "helpful", "thumbs": "THUMBS_UP"})
    out = await asyncio.to_thread(subprocess.run, [grpcurl, "-plaintext", "-H", f"authorization: Bearer {key}", "-d",
                                                   body, fb_gateway.grpc, "servoloop.v1.Feedback/Submit"],
                                  capture_output=True, text=True, check=True, timeout=30)
    [event] = feedback_events(fb_gateway, json.loads(out.stdout)["id"])
    assert (event.target_id, event.kind, event.thumbs, event.metric_name) == (target, "thumbs", True, "helpful")

# --- idempotency -----------------------------------------------------------------------------------------

async def test_replaying_an_idempotency_key_returns_the_same_id_and_publishes_once(fb_gateway: RunningGateway) -> None:
    key = fb_gateway.key(tenant="idem")
    target = await infer_http(fb_gateway, key)
    body = {"target_id": target, "rating": 2, "idempotency_key": "retry-1"}

    first = await post_feedback(fb_gateway, key, body)
    again = await post_feedback(fb_gateway, key, body)
    via_header = await post_feedback(fb_gateway, key, {"target_id": target, "rating": 2},
                                     **{"Idempotency-Key": "retry-1"})
    over_grpc = await submit_grpc(fb_gateway, key, fpb.SubmitFeedbackRequest(target_id=target, rating=2,
                                                                            idempotency_key="retry-1"))

    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    assert again.status_code == via_header.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert first.json() == again.json() == via_header.json()
    assert over_grpc.id == first.json()["id"] and over_grpc.replayed
    assert first.json()["id"] == idempotent_event_id("idem", "retry-1")  # the same on every replica
    [event] = feedback_events(fb_gateway, first.json()["id"])
    assert event.idempotency_key == "retry-1"


async def test_reusing_an_idempotency_key_for_different_feedback_is_a_conflict(fb_gateway: RunningGateway) -> None:
    key = fb_gateway.key(tenant="idem")
    target = await infer_http(fb_gateway, key)
    assert (await post_feedback(fb_gateway, key, {"target_id": target, "rating": 2,
                                                  "idempotency_key": "k-conflict"})).status_code == 201
    before = len(feedback_events(fb_gateway))

    r = await post_feedback(fb_gateway, key, {"target_id": target, "rating": 3, "idempotency_key": "k-conflict"})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await submit_grpc(fb_gateway, key, fpb.SubmitFeedbackRequest(target_id=target, comment="x",
                                                                     idempotency_key="k-conflict"))

    assert r.status_code == 409 and r.json()["error"]["param"] == "idempotency_key"
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(feedback_events(fb_gateway)) == before


async def test_idempotency_keys_are_per_tenant_and_absent_keys_never_dedupe(fb_gateway: RunningGateway) -> None:
    key_a, key_b = fb_gateway.key(tenant="idem-a"), fb_gateway.key(tenant="idem-b")
    ta, tb = await infer_http(fb_gateway, key_a), await infer_http(fb_gateway, key_b)
    a = await post_feedback(fb_gateway, key_a, {"target_id": ta, "thumbs": "up", "idempotency_key": "same"})
    b = await post_feedback(fb_gateway, key_b, {"target_id": tb, "thumbs": "up", "idempotency_key": "same"})
    plain = [await post_feedback(fb_gateway, key_a, {"target_id": ta, "thumbs": "up"}) for _ in range(2)]

    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]
    assert [p.status_code for p in plain] == [201, 201] and plain[0].json()["id"] != plain[1].json()["id"]


# --- auth, scope, availability ---------------------------------------------------------------------------

async def test_feedback_needs_a_key_with_the_feedback_scope(fb_gateway: RunningGateway) -> None:
    owner = fb_gateway.key(tenant="scoped")
    infer_only = fb_gateway.key(tenant="scoped", scopes=("infer",))
    target = await infer_http(fb_gateway, owner)
    body = {"target_id": target, "thumbs": "up"}

    no_key = await post_feedback(fb_gateway, None, body)
    bad_key = await post_feedback(fb_gateway, "sl-000000000000-nope", body)
    no_scope = await post_feedback(fb_gateway, infer_only, body)
    codes = []
    for key in (None, infer_only):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await submit_grpc(fb_gateway, key, fpb.SubmitFeedbackRequest(target_id=target, thumbs=fpb.THUMBS_UP))
        codes.append(e.value.code())

    assert no_key.status_code == bad_key.status_code == 401
    assert no_scope.status_code == 403 and no_scope.json()["error"]["code"] == "insufficient_scope"
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED]


async def test_without_an_event_pipeline_feedback_is_unavailable(fb_gateway: RunningGateway) -> None:
    key = fb_gateway.key()
    target = await infer_http(fb_gateway, key)
    events, fb_gateway.gw.events = fb_gateway.gw.events, None
    try:
        r = await post_feedback(fb_gateway, key, {"target_id": target, "thumbs": "up"})
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await submit_grpc(fb_gateway, key, fpb.SubmitFeedbackRequest(target_id=target, thumbs=fpb.THUMBS_UP))
    finally:
        fb_gateway.gw.events = events
    assert r.status_code == 503 and r.json()["error"]["code"] == "feedback_unavailable"
    assert "event pipeline" in r.json()["error"]["message"]
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_failing_ownership_lookup_is_503_not_a_false_404(fb_gateway: RunningGateway) -> None:
    async def down(tenant: str, inference_id: str) -> bool:
        raise ConnectionError("store down")

    fb_gateway.gw.inference_owners.lookup = down
    try:
        r = await post_feedback(fb_gateway, fb_gateway.key(), {"target_id": new_event_id(), "thumbs": "up"})
    finally:
        fb_gateway.gw.inference_owners.lookup = None
    assert r.status_code == 503 and r.json()["error"]["code"] == "feedback_unavailable"


# --- bad input -------------------------------------------------------------------------------------------

T = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b"  # well-formed; validation fails before ownership is checked
U = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2c"
BAD = [
    # (name, body, status, param)
    ("missing target_id", {"thumbs": "up"}, 400, "target_id"),
    ("target_id not a uuid", {"target_id": "chatcmpl-1", "thumbs": "up"}, 400, "target_id"),
    ("target_id not a string", {"target_id": 7, "thumbs": "up"}, 400, "target_id"),
    ("no value", {"target_id": T}, 400, "value"),
    ("two values", {"target_id": T, "thumbs": "up", "rating": 4}, 400, "value"),
    ("thumbs sideways", {"target_id": T, "thumbs": "sideways"}, 400, "thumbs"),
    ("rating as string", {"target_id": T, "rating": "4"}, 400, "rating"),
    ("rating above range", {"target_id": T, "rating": 5.5}, 400, "rating"),
    ("rating below range", {"target_id": T, "rating": -1}, 400, "rating"),
    ("empty comment", {"target_id": T, "comment": "  "}, 400, "comment"),
    ("comment too long", {"target_id": T, "comment": "x" * 101}, 400, "comment"),
    ("correction too long", {"target_id": T, "correction": "x" * 201}, 400, "correction"),
    ("metric name with spaces", {"target_id": T, "thumbs": "up", "metric_name": "my metric"}, 400, "metric_name"),
    ("metric name of another kind", {"target_id": T, "thumbs": "up", "metric_name": "rating"}, 400, "metric_name"),
    ("preference of one inference", {"target_id": T, "preference": {"preferred_id": T, "other_id": T}}, 400,
     "preference.other_id"),
    ("preference without the target", {"target_id": T, "preference": {"preferred_id": U, "other_id": U[:-1] + "d"}},
     400, "target_id"),
    ("preference id malformed", {"target_id": T, "preference": {"preferred_id": "x", "other_id": T}}, 400,
     "preference.preferred_id"),
    ("preference missing an id", {"target_id": T, "preference": {"preferred_id": T}}, 400, "preference.other_id"),
    ("idempotency key with a newline", {"target_id": T, "thumbs": "up", "idempotency_key": "a\nb"}, 400,
     "idempotency_key"),
    ("unknown field", {"target_id": T, "ratng": 4}, 400, "ratng"),
    ("body too large", {"target_id": T, "comment": "x" * 5000}, 413, None),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD, ids=[c[0] for c in BAD])
async def test_bad_feedback_gets_a_clear_error_naming_the_field(fb_gateway: RunningGateway, name: str, body: dict,
                                                               status: int, param: str | None) -> None:
    before = len(feedback_events(fb_gateway))
    r = await post_feedback(fb_gateway, fb_gateway.key(), body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert len(feedback_events(fb_gateway)) == before


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "empty"), (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b'{"target_id": NaN}', None),
])
async def test_unparseable_feedback_bodies_are_400(fb_gateway: RunningGateway, raw: bytes, message: str | None) -> None:
    r = await post_feedback(fb_gateway, fb_gateway.key(), raw)
    assert r.status_code == 400, r.text
    assert message is None or message in r.json()["error"]["message"]


async def test_a_nan_rating_is_refused(fb_gateway: RunningGateway) -> None:
    r = await post_feedback(fb_gateway, fb_gateway.key(), json.dumps({"target_id": T, "rating": float("nan")}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "rating"


async def test_differing_idempotency_header_and_field_are_refused(fb_gateway: RunningGateway) -> None:
    r = await post_feedback(fb_gateway, fb_gateway.key(), {"target_id": T, "thumbs": "up", "idempotency_key": "a"},
                            **{"Idempotency-Key": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "idempotency_key"


@pytest.mark.parametrize(("req", "param"), [
    (fpb.SubmitFeedbackRequest(target_id=T), "value"),
    (fpb.SubmitFeedbackRequest(target_id=T, thumbs=fpb.THUMBS_UNSPECIFIED), "thumbs"),
    (fpb.SubmitFeedbackRequest(target_id=T, rating=float("inf")), "rating"),
    (fpb.SubmitFeedbackRequest(target_id="nope", comment="hi"), "target_id"),
    (fpb.SubmitFeedbackRequest(target_id=T, metric_name="a b", comment="hi"), "metric_name"),
    (fpb.SubmitFeedbackRequest(target_id=T, preference=fpb.Preference(preferred_id=T)), "preference.other_id"),
    (b"\xff\xff\xff", None),
    (b"\x0a\x05hello" + b"\x2a" + b"\x00" * 4096, None),  # over max_body_bytes
], ids=["no value", "thumbs unspecified", "infinite rating", "bad target", "bad metric", "half a preference",
        "malformed bytes", "too large"])
async def test_bad_feedback_over_grpc_is_invalid_argument(fb_gateway: RunningGateway, req: Any,
                                                          param: str | None) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await submit_grpc(fb_gateway, fb_gateway.key(), req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert _trailer(e.value, "servoloop-error-param") == param


# --- the core without transports: ownership lag, replicas ------------------------------------------------

def _principal(tenant: str = "t", scopes: tuple[str, ...] = ("feedback",)) -> Principal:
    return Principal("k" * 12, tenant, frozenset(scopes), KeyLimits(0, 0, 0), False)


def _service(settings: FeedbackSettings, owners: InferenceOwners, published: list) -> FeedbackService:
    return FeedbackService(settings, owners, RateLimiter(RateLimitSettings()),
                           publisher=lambda: SimpleNamespace(publish=published.append))


def _uuid7_at(ms: int) -> str:
    return str(uuid.UUID(int=(ms << 80) | (7 << 76) | (0b10 << 62) | 1))


async def test_a_fresh_id_is_rechecked_until_ingestion_catches_up() -> None:
    settings = FeedbackSettings(ingest_grace_s=2.0, recheck_interval_s=0.05)
    target = new_event_id()
    calls: list[float] = []
    start = time.monotonic()

    async def store_has(tenant: str, inference_id: str) -> bool:  # the event lands 0.3 s later
        calls.append(time.monotonic() - start)
        return tenant == "t" and inference_id == target and time.monotonic() - start > 0.3

    owners = InferenceOwners(settings, lookup=store_has)
    assert await owners.owns("t", target)
    assert len(calls) > 2 and 0.3 < calls[-1] < 1.5
    calls.clear()
    assert not await owners.owns("other", target)  # another tenant's: waits out the grace like an unknown id
    assert calls[-1] > 1.5


async def test_an_old_or_non_v7_id_is_answered_at_once() -> None:
    calls: list[str] = []

    async def store_has(tenant: str, inference_id: str) -> bool:
        calls.append(inference_id)
        return False

    owners = InferenceOwners(FeedbackSettings(ingest_grace_s=30), lookup=store_has)
    old = _uuid7_at(int(time.time() * 1000) - 60_000)
    assert uuid7_ms(old) is not None and uuid7_ms(str(uuid.uuid4())) is None
    start = time.monotonic()
    assert not await owners.owns("t", old)
    assert not await owners.owns("t", str(uuid.uuid4()))
    assert time.monotonic() - start < 1 and len(calls) == 2


async def test_the_local_index_is_bounded_and_only_ever_says_yes_for_the_owner() -> None:
    owners = InferenceOwners(FeedbackSettings(recent_inferences=2, ingest_grace_s=0))
    ids = [new_event_id() for _ in range(3)]
    for i in ids:
        owners.record(i, "t")
    assert len(owners) == 2
    assert not await owners.owns("t", ids[0])  # evicted, and no lookup to ask
    assert await owners.owns("t", ids[2]) and not await owners.owns("u", ids[2])


async def test_lookup_timeouts_are_unavailable() -> None:
    async def slow(tenant: str, inference_id: str) -> bool:
        await asyncio.sleep(5)
        return True

    owners = InferenceOwners(FeedbackSettings(lookup_timeout_s=0.05, ingest_grace_s=0), lookup=slow)
    with pytest.raises(FeedbackUnavailable):
        await owners.owns("t", new_event_id())


async def test_two_replicas_give_one_idempotency_key_the_same_event_id() -> None:
    target = new_event_id()
    published: list[FeedbackEvent] = []
    replicas = []
    for _ in range(2):
        owners = InferenceOwners(FeedbackSettings())
        owners.record(target, "t")
        replicas.append(_service(FeedbackSettings(), owners, published))
    sub = FeedbackSubmission(target_id=target, thumbs=True, idempotency_key="k1")

    a = await replicas[0].submit(_principal(), sub)
    b = await replicas[1].submit(_principal(), sub)  # another replica never saw the first: it publishes too...

    assert a.id == b.id == published[0].event_id == published[1].event_id  # ...under the same event id
    assert (await replicas[0].submit(_principal(), sub)).replayed and len(published) == 2
    with pytest.raises(Conflict):
        await replicas[0].submit(_principal(), FeedbackSubmission(target_id=target, thumbs=False,
                                                                  idempotency_key="k1"))


async def test_concurrent_submissions_with_one_key_publish_once() -> None:
    target = new_event_id()
    published: list[FeedbackEvent] = []

    async def store_has(tenant: str, inference_id: str) -> bool:
        await asyncio.sleep(0.05)
        return True

    service = _service(FeedbackSettings(), InferenceOwners(FeedbackSettings(), lookup=store_has), published)
    sub = FeedbackSubmission(target_id=target, rating=1.0, idempotency_key="race")
    receipts = await asyncio.gather(*(service.submit(_principal(), sub) for _ in range(5)))
    assert len(published) == 1 and {r.id for r in receipts} == {published[0].event_id}
    assert sum(not r.replayed for r in receipts) == 1


async def test_the_core_checks_scope_and_ownership_itself() -> None:
    published: list[FeedbackEvent] = []
    service = _service(FeedbackSettings(), InferenceOwners(FeedbackSettings(ingest_grace_s=0)), published)
    sub = FeedbackSubmission(target_id=str(uuid_utils.uuid7()), thumbs=True)
    with pytest.raises(PermissionDenied):
        await service.submit(_principal(scopes=("infer",)), sub)
    with pytest.raises(NotFound):
        await service.submit(_principal(), sub)
    assert published == []


async def test_feedback_outcomes_are_counted_in_metrics(fb_gateway: RunningGateway) -> None:
    key = fb_gateway.key(tenant="counted")
    target = await infer_http(fb_gateway, key)
    body = {"target_id": target, "thumbs": "up", "idempotency_key": "count-1"}
    await post_feedback(fb_gateway, key, body)
    await post_feedback(fb_gateway, key, body)
    await post_feedback(fb_gateway, key, {"target_id": "0190a7d2-0000-7000-8000-000000000000", "thumbs": "up"})

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{fb_gateway.http}/metrics")).text
    for outcome in ("accepted", "replayed", "not_found"):
        assert f'servoloop_feedback_total{{outcome="{outcome}",tenant="counted"}} 1.0' in text
