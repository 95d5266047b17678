"""Hypothesis strategies for every event type, derived from the msgspec definitions (bounds included)."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import strategies as st

from schemas.events import EVENT_TYPES, Event, FeedbackEvent, MalformedEvent

_text = st.text(max_size=40)


def _for(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    ti = msgspec.inspect
    if isinstance(t, ti.UnionType):
        return st.one_of(*[_for(x) for x in t.types])
    if isinstance(t, ti.NoneType):
        return st.none()
    if isinstance(t, ti.StrType):
        return _text
    if isinstance(t, ti.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, ti.BoolType):
        return st.booleans()
    if isinstance(t, ti.IntType):
        return st.integers(min_value=t.ge if t.ge is not None else -(2**63),
                           max_value=t.le if t.le is not None else 2**63 - 1)
    if isinstance(t, ti.FloatType):
        return st.floats(min_value=t.ge, max_value=t.le, allow_nan=False, allow_infinity=False)
    if isinstance(t, ti.VarTupleType):
        return st.lists(_for(t.item_type), max_size=4).map(tuple)
    if isinstance(t, ti.DictType):
        return st.dictionaries(_for(t.key_type), _for(t.value_type), max_size=4)
    if isinstance(t, ti.StructType):
        return st.builds(t.cls, **{f.name: _for(f.type) for f in t.fields})
    raise TypeError(f"no strategy for {t}")


def _feedback() -> st.SearchStrategy[FeedbackEvent]:
    """Feedback that keeps its contract: the value its kind needs is present."""

    @st.composite
    def build(draw: st.DrawFn) -> FeedbackEvent:
        kind = draw(st.sampled_from(["thumbs", "rating", "comment", "correction", "preference"]))
        target = draw(st.uuids()).hex
        other = draw(st.uuids()).hex
        values: dict[str, Any] = {
            "thumbs": {"thumbs": draw(st.booleans())},
            "rating": {"rating": draw(st.floats(-10, 10))},
            "comment": {"comment": draw(st.text(min_size=1, max_size=40))},
            "correction": {"correction": draw(st.text(min_size=1, max_size=40))},
            "preference": {"preferred_id": target, "other_id": other},
        }[kind]
        return FeedbackEvent(target_id=target, kind=kind, metric_name=draw(st.sampled_from(["", "quality"])),
                             tenant=draw(_text), idempotency_key=draw(_text), key_id=draw(_text), **values)

    return build()


def events(cls: type[Event]) -> st.SearchStrategy[Event]:
    """Valid events of type `cls`, every field drawn within its declared bounds."""
    if cls is FeedbackEvent:
        return _feedback()
    info = msgspec.inspect.type_info(cls)
    fields = {f.name: _for(f.type) for f in info.fields}  # type: ignore[attr-defined]

    def build(values: dict[str, Any]) -> Event:
        try:
            return cls(**values)
        except MalformedEvent:
            return cls()

    return st.fixed_dictionaries(fields).map(build)


def any_event() -> st.SearchStrategy[Event]:
    return st.one_of(*[events(t) for t in EVENT_TYPES])
