"""The Feedback API's core, shared by HTTP `POST /v1/feedback` and gRPC `Feedback.Submit`.

A submission rates one inference (`target_id`) under a `metric_name` with exactly one value: thumbs,
rating, comment, correction, or a preference between two inferences. `FeedbackService.submit` checks
the scope, validates, checks that the caller's tenant owns every inference named, and publishes one
`FeedbackEvent` on the event path (then tells the feedback observers).

Ownership (`InferenceOwners`): a bounded index of the inferences this gateway served, then an optional
lookup in the store. Both only ever answer "yes, this tenant's": an unknown id and another tenant's id
take the same path and get the same 404, so the answer (and its timing) is no existence oracle. Events
reach the store a few seconds after an inference ends, so an id whose UUIDv7 time is within
`ingest_grace_s` is re-checked (backing off) until then before the answer is 404; older ids and
non-v7 ids are answered at once. A lookup that fails or times out is 503 (retry), never a false 404.

Idempotency: a submission with an `idempotency_key` gets an event id derived from tenant + key, so every
replica and every redelivery names the same event (the store dedupes by event id; reads count one
feedback per tenant + key). This replica also remembers recent keys: a replay of the same body returns
the original id and publishes nothing; the same key with a different body is a Conflict (409).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec

from gateway.auth import Principal
from gateway.events import EventPublisher
from gateway.limits import RateLimiter
from gateway.service import Outcome
from gateway.settings import FeedbackSettings
from schemas.errors import Conflict, ErrorKind, InvalidRequest, NotFound, ServoloopError
from schemas.events import FeedbackEvent, FeedbackKind

log = logging.getLogger(__name__)

KINDS: tuple[FeedbackKind, ...] = ("thumbs", "rating", "comment", "correction", "preference")
OwnerLookup = Callable[[str, str], Awaitable[bool]]
"""`(tenant, inference_id) -> True` when the store holds that inference for that tenant."""

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_METRIC = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,127}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_MAX_USER_CHARS = 256
_MAX_BACKOFF_S = 2.0
_IDEMPOTENT_NS = uuid.UUID("3b0c5a6e-1f7d-4c2b-9e61-7a2f0d8c4e15")


class FeedbackUnavailable(ServoloopError):
    """Feedback cannot be accepted right now: no event pipeline, or the ownership lookup failed."""

    kind = ErrorKind.UNAVAILABLE
    code = "feedback_unavailable"


@dataclass(frozen=True, slots=True)
class FeedbackSubmission:
    """What a client sent, as the front ends decode it; unset values are None."""

    target_id: str
    metric_name: str = ""
    thumbs: bool | None = None
    rating: float | None = None
    comment: str | None = None
    correction: str | None = None
    preference: tuple[str, str] | None = None  # (preferred_id, other_id)
    idempotency_key: str = ""
    user: str = ""


@dataclass(frozen=True, slots=True)
class FeedbackReceipt:
    """The answer: the feedback's id, and whether it is the replay of an earlier submission."""

    id: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ValidFeedback:
    """A submission that passed `validate`: one kind, normalised ids, metric name filled in."""

    target_id: str
    kind: FeedbackKind
    metric_name: str
    thumbs: bool | None = None
    rating: float | None = None
    comment: str = ""
    correction: str = ""
    preferred_id: str = ""
    other_id: str = ""
    idempotency_key: str = ""
    user: str = ""

    def inference_ids(self) -> list[tuple[str, str]]:
        """(inference id, the field that named it) for every inference the caller must own."""
        if self.kind != "preference":
            return [(self.target_id, "target_id")]
        return [(self.preferred_id, "preference.preferred_id"), (self.other_id, "preference.other_id")]

    def fingerprint(self) -> bytes:
        """A digest of everything that makes this feedback what it is (not who sent it)."""
        fields = (self.target_id, self.kind, self.metric_name, self.thumbs, self.rating, self.comment,
                  self.correction, self.preferred_id, self.other_id, self.user)
        return hashlib.blake2b(msgspec.msgpack.encode(fields), digest_size=16).digest()

    def event(self, principal: Principal, *, event_id: str | None = None) -> FeedbackEvent:
        extra = {"event_id": event_id} if event_id else {}
        return FeedbackEvent(
            tenant=principal.tenant, key_id=principal.key_id, target_id=self.target_id, kind=self.kind,
            metric_name=self.metric_name, thumbs=self.thumbs, rating=self.rating, comment=self.comment,
            correction=self.correction, preferred_id=self.preferred_id, other_id=self.other_id,
            idempotency_key=self.idempotency_key, user=self.user, **extra,  # type: ignore[arg-type]
        )


def _inference_id(value: str, param: str) -> str:
    if not _UUID.fullmatch(value):
        what = "is required" if not value else f"must be an inference id (a UUID), got {value[:80]!r}"
        raise InvalidRequest(f"'{param}' {what}", param=param)
    return value.lower()


def _text(value: str, param: str, limit: int) -> str:
    if not value.strip():
        raise InvalidRequest(f"'{param}' must not be empty", param=param)
    if len(value) > limit:
        raise InvalidRequest(f"'{param}' is {len(value)} characters; the limit is {limit}", param=param)
    return value


def validate(sub: FeedbackSubmission, settings: FeedbackSettings) -> ValidFeedback:
    """Check a submission against the API's rules; raises InvalidRequest naming the field."""
    values = {"thumbs": sub.thumbs, "rating": sub.rating, "comment": sub.comment, "correction": sub.correction,
              "preference": sub.preference}
    given = [k for k, v in values.items() if v is not None]
    if len(given) != 1:
        got = f"got {', '.join(given)}" if given else "got none"
        raise InvalidRequest(f"feedback needs exactly one value of thumbs, rating, comment, correction or "
                             f"preference; {got}", param="value")
    kind: FeedbackKind = given[0]  # type: ignore[assignment]
    target = _inference_id(sub.target_id, "target_id")
    metric = sub.metric_name or kind
    if not _METRIC.fullmatch(metric):
        raise InvalidRequest("'metric_name' must be 1-128 letters, digits or '_.:-', starting with a letter; got "
                             f"{metric[:80]!r}", param="metric_name")
    if metric in KINDS and metric != kind:
        raise InvalidRequest(f"metric name {metric!r} is reserved for {metric} feedback; this is {kind} feedback",
                             param="metric_name")
    if sub.idempotency_key and not _IDEMPOTENCY_KEY.fullmatch(sub.idempotency_key):
        raise InvalidRequest("'idempotency_key' must be 1-255 printable ASCII characters", param="idempotency_key")
    if len(sub.user) > _MAX_USER_CHARS:
        raise InvalidRequest(f"'user' is longer than {_MAX_USER_CHARS} characters", param="user")
    fb = {"target_id": target, "kind": kind, "metric_name": metric, "idempotency_key": sub.idempotency_key,
          "user": sub.user}
    if sub.thumbs is not None:
        fb["thumbs"] = bool(sub.thumbs)
    elif sub.rating is not None:
        r = float(sub.rating)
        if not math.isfinite(r) or not settings.rating_min <= r <= settings.rating_max:
            raise InvalidRequest(f"'rating' must be a finite number in [{settings.rating_min:g}, "
                                 f"{settings.rating_max:g}]; got {r!r}", param="rating")
        fb["rating"] = r
    elif sub.comment is not None:
        fb["comment"] = _text(sub.comment, "comment", settings.max_comment_chars)
    elif sub.correction is not None:
        fb["correction"] = _text(sub.correction, "correction", settings.max_correction_chars)
    else:
        assert sub.preference is not None
        preferred = _inference_id(sub.preference[0], "preference.preferred_id")
        other = _inference_id(sub.preference[1], "preference.other_id")
        if preferred == other:
            raise InvalidRequest("a preference needs two different inferences; 'preference.other_id' equals "
                                 "'preference.preferred_id'", param="preference.other_id")
        if target not in (preferred, other):
            raise InvalidRequest("'target_id' must be one of the two inferences of the preference",
                                 param="target_id")
        fb |= {"preferred_id": preferred, "other_id": other}
    return ValidFeedback(**fb)  # type: ignore[arg-type]


def uuid7_ms(inference_id: str) -> int | None:
    """The creation time (Unix ms) a UUIDv7 carries, or None for any other id."""
    try:
        u = uuid.UUID(inference_id)
    except ValueError:
        return None
    return u.int >> 80 if u.version == 7 else None


class InferenceOwners:
    """Which inferences a tenant owns: this gateway's recent ones (bounded), then `lookup` (the store).

    `observe` is an InferenceService observer. `owns` answers True only for an inference of that tenant;
    see the module docstring for the grace period and why foreign and unknown ids take the same path.
    """

    def __init__(self, settings: FeedbackSettings, *, lookup: OwnerLookup | None = None,
                 clock: Callable[[], float] = time.time):
        self.lookup = lookup  # wired by whoever owns the store (`servoloop up`); None: the local index only
        self._capacity = settings.recent_inferences
        self._grace_s = settings.ingest_grace_s
        self._interval_s = settings.recheck_interval_s
        self._timeout_s = settings.lookup_timeout_s
        self._clock = clock
        self._recent: OrderedDict[str, str] = OrderedDict()

    def record(self, inference_id: str, tenant: str) -> None:
        if self._capacity == 0 or not inference_id:
            return
        self._recent[inference_id] = tenant
        if len(self._recent) > self._capacity:
            self._recent.popitem(last=False)

    def observe(self, outcome: Outcome) -> None:
        adm = outcome.admission
        self.record(adm.request.request_id, adm.principal.tenant)

    def __len__(self) -> int:
        return len(self._recent)

    async def owns(self, tenant: str, inference_id: str) -> bool:
        """True when `tenant` owns `inference_id`. Raises FeedbackUnavailable when the lookup fails."""
        deadline = self._deadline(inference_id)
        pause = self._interval_s
        while True:
            if self._recent.get(inference_id) == tenant or await self._look_up(tenant, inference_id):
                return True
            left = deadline - self._clock()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _MAX_BACKOFF_S)

    def _deadline(self, inference_id: str) -> float:
        """Until when (wall clock) a miss may still be ingestion lag: the id's UUIDv7 time plus the grace."""
        now = self._clock()
        created_ms = uuid7_ms(inference_id)
        if created_ms is None or self._grace_s == 0:
            return now
        # A forged future timestamp buys at most one grace period.
        return min(created_ms / 1000 + self._grace_s, now + self._grace_s)

    async def _look_up(self, tenant: str, inference_id: str) -> bool:
        if self.lookup is None:
            return False
        try:
            return bool(await asyncio.wait_for(self.lookup(tenant, inference_id), self._timeout_s))
        except Exception as e:
            log.warning("inference ownership lookup failed for %s: %s: %s", inference_id, type(e).__name__, e)
            raise FeedbackUnavailable("cannot check the rated inference right now; retry shortly") from None


def idempotent_event_id(tenant: str, idempotency_key: str) -> str:
    """The event id of a tenant's feedback with this key: the same on every replica, every time."""
    return str(uuid.uuid5(_IDEMPOTENT_NS, f"{tenant}\x00{idempotency_key}"))


class FeedbackService:
    """Accepts feedback: scope, rate limit, validation, ownership, idempotency, publish, observers."""

    def __init__(self, settings: FeedbackSettings, owners: InferenceOwners, limiter: RateLimiter, *,
                 publisher: Callable[[], EventPublisher | None],
                 observers: Sequence[Callable[[FeedbackEvent], None]] = (),
                 count: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._count = count  # (tenant, outcome): accepted | replayed | an error code
        self.owners = owners
        self._limiter = limiter
        self._publisher = publisher  # looked up per submission: None means no event pipeline
        self._observers = observers  # the gateway's live list: observers added later are called too
        self._clock = clock
        self._keys: OrderedDict[tuple[str, str], tuple[bytes, str]] = OrderedDict()

    async def submit(self, principal: Principal, submission: FeedbackSubmission) -> FeedbackReceipt:
        """Accept one feedback. Raises PermissionDenied, FeedbackUnavailable, RateLimited, InvalidRequest,
        NotFound (an inference the tenant does not own, or none at all) or Conflict (a reused idempotency key).
        """
        if self._count is None:
            return await self._submit(principal, submission)
        try:
            receipt = await self._submit(principal, submission)
        except ServoloopError as e:
            self._count(principal.tenant, e.code)
            raise
        self._count(principal.tenant, "replayed" if receipt.replayed else "accepted")
        return receipt

    async def _submit(self, principal: Principal, submission: FeedbackSubmission) -> FeedbackReceipt:
        principal.require("feedback")
        publisher = self._publisher()
        if publisher is None:
            raise FeedbackUnavailable("this gateway has no event pipeline, so it cannot record feedback")
        self._limiter.admit(principal.key_id, principal.limits, 0, self._clock())
        fb = validate(submission, self.settings)
        key = (principal.tenant, fb.idempotency_key) if fb.idempotency_key else None
        fingerprint = fb.fingerprint() if key else b""
        if key and (receipt := self._replay(key, fingerprint)):
            return receipt
        for inference_id, param in fb.inference_ids():
            if not await self.owners.owns(principal.tenant, inference_id):
                raise NotFound(f"no inference {inference_id!r} for this key", param=param)
        if key and (receipt := self._replay(key, fingerprint)):  # a concurrent submission won the race
            return receipt
        event = fb.event(principal, event_id=idempotent_event_id(*key) if key else None)
        publisher.publish(event)
        if key:
            self._remember(key, fingerprint, event.event_id)
        for observe in self._observers:
            try:
                observe(event)
            except Exception:  # an observer (e.g. Langfuse scores) never changes the answer
                log.exception("feedback observer failed")
        return FeedbackReceipt(event.event_id)

    def _replay(self, key: tuple[str, str], fingerprint: bytes) -> FeedbackReceipt | None:
        seen = self._keys.get(key)
        if seen is None:
            return None
        if seen[0] != fingerprint:
            raise Conflict("this idempotency key was already used for different feedback", param="idempotency_key")
        return FeedbackReceipt(seen[1], replayed=True)

    def _remember(self, key: tuple[str, str], fingerprint: bytes, event_id: str) -> None:
        if self.settings.idempotency_keys == 0:
            return
        self._keys[key] = (fingerprint, event_id)
        if len(self._keys) > self.settings.idempotency_keys:
            self._keys.popitem(last=False)
