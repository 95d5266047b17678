"""Versioned event types: one definition each, msgpack-encoded on Kafka, one ClickHouse table each.

Every event is immutable, carries its own UUIDv7 `event_id` (time-ordered, the dedup key end to end)
and a `schema_version`. New fields get defaults, so an older producer's bytes still decode.

Evolution rules (tested in tests/schemas): add fields only with a default, never rename or retype
one, never change a default (fields equal to their default are not encoded, to keep records small),
and bump the type's `schema_version` factory when its meaning changes. Every field maps to one column
of the type's table (schemas/migrations): a new field needs a migration adding its column.
`*_ms` fields typed `EpochMs` become `DateTime64(3, 'UTC')` columns named without the suffix
(`ts_ms` -> `ts`).
"""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from typing import Annotated, ClassVar, Literal

import msgspec
import uuid_utils

from schemas import topics
from schemas.errors import InvalidRequest

# Bounds mirror the ClickHouse column types, so a decoded event is always insertable: a value the
# table could not hold fails decoding (and becomes a dead letter) instead of poisoning a batch.
EpochMs = Annotated[int, msgspec.Meta(ge=0, le=10_413_791_999_999)]  # DateTime64(3): up to 2299-12-31
UInt32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Share = Annotated[float, msgspec.Meta(ge=0, le=1)]

Operation = Literal["chat", "text_completion"]
Status = Literal["ok", "error", "cancelled", "blocked"]
GuardAction = Literal["allow", "redact", "block"]
Side = Literal["input", "output"]
FeedbackKind = Literal["thumbs", "rating", "comment", "correction", "preference"]


def new_event_id() -> str:
    """A UUIDv7 string: unique, and sortable by creation time."""
    return str(uuid_utils.uuid7())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _v1() -> int:
    # A factory, not a plain default: omit_defaults never drops it, so every record names its version.
    return 1


class MalformedEvent(InvalidRequest, ValueError):
    """Bytes that are not a valid event: `reason` is `undecodable`, `unknown_type` or `invalid`."""

    code = "malformed_event"

    def __init__(self, message: str, *, reason: str):
        super().__init__(message, details={"reason": reason})
        self.reason = reason


class Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type", omit_defaults=True, gc=False):
    """Base of every event. Subclasses set `topic` (suffix after the configured prefix) and `table`."""

    topic: ClassVar[str]
    table: ClassVar[str]

    event_id: str = msgspec.field(default_factory=new_event_id)
    schema_version: int = msgspec.field(default_factory=_v1)
    ts_ms: EpochMs = msgspec.field(default_factory=now_ms)
    tenant: str = ""

    def partition_key(self) -> bytes:
        """Kafka key: events of one tenant stay ordered on one partition."""
        return self.tenant.encode()


class Message(msgspec.Struct, frozen=True, gc=False):
    """One chat message as it left the guardrails (redacted)."""

    role: str
    content: str


class InferenceEvent(Event, kw_only=True, frozen=True, tag="inference"):
    """One served request, after output guardrails: who, which model version, what, how fast, how it ended.

    `prompt`/`messages`/`response` hold redacted text only; `user` is the caller's end-user id (may be
    empty); `guardrail_types` are finding types (never text).
    """

    topic: ClassVar[str] = topics.INFERENCES
    table: ClassVar[str] = "inferences"

    request_id: str = ""
    trace_id: str = ""
    span_id: str = ""
    key_id: str = ""
    user: str = ""
    model: str = ""
    model_version: str = ""
    adapter: str = ""
    canary_arm: str = ""
    engine: str = ""
    operation: Operation = "chat"
    prompt: str = ""
    messages: tuple[Message, ...] = ()
    response: str = ""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: UInt32 = 0
    seed: Int64 | None = None
    stop: tuple[str, ...] = ()
    tokens_in: UInt32 = 0
    tokens_out: UInt32 = 0
    ttft_ms: NonNegFloat = 0.0
    latency_ms: NonNegFloat = 0.0
    status: Status = "ok"
    error_code: str = ""
    finish_reason: str = ""
    cache_hit: bool = False
    stream: bool = False
    input_action: GuardAction = "allow"
    output_action: GuardAction = "allow"
    guardrail_types: tuple[str, ...] = ()
    cost_usd: NonNegFloat = 0.0  # tokens x the price table (gateway/budgets.py); 0 for cache hits and unpriced models
    shadow: bool = False  # a shadow replay (gateway/shadow.py): never returned to a client
    shadow_of: str = ""  # for a shadow: the event id of the served inference it replays


class GuardrailEvent(Event, kw_only=True, frozen=True, tag="guardrail"):
    """One guardrail verdict: side, action, finding counts per type, detectors, cost. Never any text."""

    topic: ClassVar[str] = topics.GUARDRAILS
    table: ClassVar[str] = "guardrail_verdicts"

    request_id: str = ""
    inference_id: str = ""
    key_id: str = ""
    model: str = ""
    side: Side = "input"
    action: GuardAction = "allow"
    finding_counts: dict[str, UInt32] = msgspec.field(default_factory=dict)
    detectors: dict[str, str] = msgspec.field(default_factory=dict)
    elapsed_us: UInt32 = 0
    policy: str = "default"
    streamed: bool = False


class FeedbackEvent(Event, kw_only=True, frozen=True, tag="feedback"):
    """A rating of one inference (`target_id`), TensorZero-style: a `metric_name` and one value by `kind`.

    Contract (checked on construction and on decode): `thumbs` needs `thumbs`, `rating` needs `rating`,
    `comment`/`correction` need their text, `preference` needs `preferred_id` and `other_id` (one of
    them the target). An empty `metric_name` becomes the kind. Raises MalformedEvent otherwise.
    """

    topic: ClassVar[str] = topics.FEEDBACK
    table: ClassVar[str] = "feedback"

    target_id: str
    kind: FeedbackKind
    metric_name: str = ""
    thumbs: bool | None = None
    rating: float | None = None
    comment: str = ""
    correction: str = ""
    preferred_id: str = ""
    other_id: str = ""
    idempotency_key: str = ""
    key_id: str = ""
    user: str = ""

    def __post_init__(self) -> None:
        if not self.target_id:
            raise MalformedEvent("feedback needs a target_id", reason="invalid")
        missing = {
            "thumbs": self.thumbs is None,
            "rating": self.rating is None,
            "comment": not self.comment,
            "correction": not self.correction,
            "preference": not (self.preferred_id and self.other_id)
            or self.target_id not in (self.preferred_id, self.other_id),
        }[self.kind]
        if missing:
            raise MalformedEvent(f"{self.kind} feedback is missing its value", reason="invalid")
        if not self.metric_name:
            msgspec.structs.force_setattr(self, "metric_name", self.kind)


class ModelEvent(Event, kw_only=True, frozen=True, tag="model"):
    """A model version's lifecycle step (candidate, canary, active, rejected, rolled_back, ...).

    `lineage` is a JSON object as a string: base model, adapter, dataset snapshot, feedback window,
    eval results. Current state of a version is `argMax(state, ts)`.
    """

    topic: ClassVar[str] = topics.MODELS
    table: ClassVar[str] = "model_events"

    model: str = ""
    version_id: str = ""
    base_model: str = ""
    adapter_path: str = ""
    state: str = ""
    previous_state: str = ""
    reason: str = ""
    actor: str = ""
    lineage: str = "{}"
    artifact_sha256: str = ""  # schemas.artifacts.tree_sha256 of the adapter directory; verified before loading
    canary_share: Share = 0.0  # the share of traffic a version in `canary` gets (0..1)


class MonitorResult(Event, kw_only=True, frozen=True, tag="monitor"):
    """One monitor evaluation over a window: a metric's value against its threshold, and the verdict."""

    topic: ClassVar[str] = topics.MONITORS
    table: ClassVar[str] = "monitor_results"

    monitor: str = ""
    metric: str = ""
    model: str = ""
    model_version: str = ""
    window_start_ms: EpochMs = 0
    window_end_ms: EpochMs = 0
    value: float = 0.0
    threshold: float = 0.0
    status: Literal["ok", "warn", "alert", "insufficient_data"] = "ok"
    sample_size: UInt32 = 0
    details: str = "{}"


class RetrainTrigger(Event, kw_only=True, frozen=True, tag="retrain"):
    """A decision to retrain a model: method, why (`monitor_event_id`), on which feedback window."""

    topic: ClassVar[str] = topics.RETRAIN
    table: ClassVar[str] = "retrain_triggers"

    model: str = ""
    model_version: str = ""
    method: Literal["dpo", "sft"] = "dpo"
    reason: str = ""
    monitor_event_id: str = ""
    window_start_ms: EpochMs = 0
    window_end_ms: EpochMs = 0
    actor: str = ""
    params: str = "{}"


class GradeEvent(Event, kw_only=True, frozen=True, tag="grade"):
    """An automatic grade of one inference (`target_id`) by a grader (feedback/graders): a score and a label.

    Like feedback, grades are append-only and join their inference by id; `model`/`model_version` are
    copied from the graded inference so per-version grade rates need no join. `score` is in [0, 1] for
    the bundled graders (toxicity probability, share of unsupported claims, rubric score); `label` is
    the grader's verdict (`toxic`/`benign`, `grounded`/`hallucinated`, `pass`/`fail`, `win`/`loss`/`tie`).
    Pairwise graders set `other_id` (the inference compared against) and `other_version`.
    `explanation` is a short human-readable reason or a JSON object of sub-scores.
    """

    topic: ClassVar[str] = topics.GRADES
    table: ClassVar[str] = "grades"

    grader: str = ""
    grader_version: str = ""
    target_id: str = ""
    model: str = ""
    model_version: str = ""
    score: float = 0.0
    label: str = ""
    explanation: str = ""
    other_id: str = ""
    other_version: str = ""
    inference_ts_ms: EpochMs = 0  # when the graded inference happened: grade ts - this = grading lag


BudgetScope = Literal["tenant", "key"]
BudgetPeriod = Literal["day", "month"]


def period_bounds(period: BudgetPeriod, now_s: float) -> tuple[int, int]:
    """(start, reset) of the UTC day or month holding `now_s`, as epoch milliseconds."""
    now = dt.datetime.fromtimestamp(now_s, dt.UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        reset = start + dt.timedelta(days=1)
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        reset = (start + dt.timedelta(days=32)).replace(day=1)
    return int(start.timestamp() * 1000), int(reset.timestamp() * 1000)


class BudgetEvent(Event, kw_only=True, frozen=True, tag="budget"):
    """A spend budget set (or cleared: both limits 0) for one tenant or key over a UTC day or month.

    Append-only like model events: the budget in force for (`scope`, `subject`, `period`) is the latest
    row. `subject` is the tenant name or the key id; `tenant` is the tenant it belongs to (empty for a
    key budget set without knowing the key's tenant). Limits are in the price table's unit (USD).
    """

    topic: ClassVar[str] = topics.BUDGETS
    table: ClassVar[str] = "budgets"

    scope: BudgetScope = "tenant"
    subject: str = ""
    period: BudgetPeriod = "day"
    soft_usd: NonNegFloat = 0.0  # 0: no soft limit
    hard_usd: NonNegFloat = 0.0  # 0: no hard limit
    actor: str = ""
    reason: str = ""


class BudgetAlert(Event, kw_only=True, frozen=True, tag="budget_alert"):
    """Spend crossed a budget's soft limit (`level` soft) or hard limit (`level` hard) in one period.

    One per (scope, subject, period, period start, level): its `event_id` is derived from those, so a
    second gateway (or a restarted one) raising the same alert is deduplicated like any event.
    """

    topic: ClassVar[str] = topics.BUDGET_ALERTS
    table: ClassVar[str] = "budget_alerts"

    scope: BudgetScope = "tenant"
    subject: str = ""
    period: BudgetPeriod = "day"
    level: Literal["soft", "hard"] = "soft"
    period_start_ms: EpochMs = 0
    reset_ms: EpochMs = 0  # when the period ends and spend starts again from 0
    spend_usd: NonNegFloat = 0.0
    limit_usd: NonNegFloat = 0.0


_DEAD_LETTER_NS = uuid.UUID("6f1d3c52-9a57-4d0e-8f57-1b8a4de2a0c1")


class DeadLetter(Event, kw_only=True, frozen=True, tag="dead_letter"):
    """A record the ingester could not take: where it came from, why, and its bytes (base64) for replay.

    Build with `DeadLetter.of(...)`: its `event_id` is derived from the source position (or the bytes),
    so a redelivered bad record is deduplicated like any event.
    """

    topic: ClassVar[str] = topics.DEAD_LETTER
    table: ClassVar[str] = "dead_letters"

    source_topic: str = ""
    partition: Int64 = -1
    offset: Int64 = -1
    reason: str = ""
    detail: str = ""
    raw_base64: str = ""

    @classmethod
    def of(cls, raw: bytes, *, reason: str, detail: str = "",
           source: tuple[str, int, int] | None = None) -> DeadLetter:
        """A dead letter for `raw` bytes read at `source` = (topic, partition, offset), if known."""
        key = f"{source[0]}/{source[1]}/{source[2]}" if source else raw.hex()
        topic, partition, offset = source or ("", -1, -1)
        return cls(event_id=str(uuid.uuid5(_DEAD_LETTER_NS, key)), source_topic=topic, partition=partition,
                   offset=offset, reason=reason, detail=detail[:2000], raw_base64=base64.b64encode(raw).decode())

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_base64)


EVENT_TYPES: tuple[type[Event], ...] = (
    InferenceEvent, GuardrailEvent, FeedbackEvent, ModelEvent, MonitorResult, RetrainTrigger, DeadLetter,
    GradeEvent, BudgetEvent, BudgetAlert,
)
EVENT_BY_TAG: dict[str, type[Event]] = {t.__struct_config__.tag: t for t in EVENT_TYPES}  # type: ignore[misc]

AnyEvent = (InferenceEvent | GuardrailEvent | FeedbackEvent | ModelEvent | MonitorResult | RetrainTrigger | DeadLetter
            | GradeEvent | BudgetEvent | BudgetAlert)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyEvent)
_tag_decoder = msgspec.msgpack.Decoder(dict[str, object])


def encode_event(event: Event) -> bytes:
    """Compact msgpack bytes of `event`, tagged with its type (`"type": "inference"`, ...)."""
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """The event encoded in `data`. Raises MalformedEvent (with a `reason`) for anything else; never more."""
    try:
        return _decoder.decode(data)
    except Exception as e:  # msgspec errors, a __post_init__ contract, invalid UTF-8, absurd nesting
        raise _malformed(data, e) from None


def _malformed(data: bytes, e: Exception) -> MalformedEvent:
    if isinstance(e, MalformedEvent):
        return e
    if not isinstance(e, msgspec.ValidationError):
        undecodable = isinstance(e, msgspec.DecodeError | UnicodeDecodeError)
        return MalformedEvent(f"not a msgpack event: {e}" if undecodable else f"invalid event: {e}",
                              reason="undecodable" if undecodable else "invalid")
    try:
        tag = _tag_decoder.decode(data).get("type")
    except Exception:
        return MalformedEvent(f"not an event record: {e}", reason="undecodable")
    known = isinstance(tag, str) and tag in EVENT_BY_TAG
    return MalformedEvent(f"invalid {tag!r} event: {e}", reason="invalid" if known else "unknown_type")


def event_to_json(event: Event) -> bytes:
    """The event as JSON (for logs, the CLI and the admin API), tag included."""
    return msgspec.json.encode(event)
