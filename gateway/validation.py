"""Turning front-end fields into a valid InferenceRequest: the one place request rules live.

Both front ends decode their wire format (JSON / protobuf) and call `make_request`; every rule about
sizes, ranges and shapes is enforced here, so HTTP and gRPC reject the same inputs with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gateway.request import ROLES, ChatMessage, InferenceRequest, Operation, SamplingParams
from gateway.settings import RequestLimits
from schemas.errors import InvalidRequest

MAX_MODEL_NAME = 256
MAX_USER_ID = 256
MAX_STOP_LEN = 256


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number, got {type(value).__name__}", param=name)
    v = float(value)
    if math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InvalidRequest(f"'{name}' must be in {bound}, got {value}", param=name)
    return v


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer, got {type(value).__name__}", param=name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _messages(raw: Sequence[tuple[str, str]], limits: RequestLimits) -> tuple[ChatMessage, ...]:
    if not raw:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    if len(raw) > limits.max_messages:
        raise InvalidRequest(f"'messages' has {len(raw)} items; at most {limits.max_messages} are allowed",
                             param="messages")
    out = []
    for i, (role, content) in enumerate(raw):
        if role not in ROLES:
            raise InvalidRequest(f"'messages[{i}].role' must be one of {sorted(ROLES)}, got {role!r}",
                                 param=f"messages[{i}].role")
        if not isinstance(content, str):
            raise InvalidRequest(f"'messages[{i}].content' must be a string", param=f"messages[{i}].content")
        out.append(ChatMessage(role, content))
    if not any(m.content.strip() for m in out if m.role != "system"):
        raise InvalidRequest("'messages' needs at least one non-empty user or assistant message", param="messages")
    return tuple(out)


def _stop(raw: Any, limits: RequestLimits) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if len(items) > limits.max_stop_sequences:
        raise InvalidRequest(f"'stop' may hold at most {limits.max_stop_sequences} sequences", param="stop")
    if any(not s or len(s) > MAX_STOP_LEN for s in items):
        raise InvalidRequest(f"each 'stop' sequence must be 1-{MAX_STOP_LEN} characters", param="stop")
    return tuple(items)


def make_request(
    *,
    limits: RequestLimits,
    model: Any,
    operation: Operation,
    messages: Sequence[tuple[str, str]] = (),
    prompt: Any = None,
    max_tokens: Any = None,
    temperature: Any = None,
    top_p: Any = None,
    stop: Any = None,
    seed: Any = None,
    min_tokens: Any = None,
    stream: bool = False,
    cache: bool = False,
    user: Any = None,
    session: Any = None,
    traceparent: str = "",
    deadline: float | None = None,
) -> InferenceRequest:
    """A validated request; raises InvalidRequest naming the offending field and the rule."""
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    if len(model) > MAX_MODEL_NAME:
        raise InvalidRequest(f"'model' must be at most {MAX_MODEL_NAME} characters", param="model")
    max_out = (limits.default_max_tokens if max_tokens is None
               else _int("max_tokens", max_tokens, 1, limits.max_output_tokens))
    params = SamplingParams(
        max_tokens=max_out,
        temperature=1.0 if temperature is None else _number("temperature", temperature, 0.0, 2.0),
        top_p=1.0 if top_p is None else _number("top_p", top_p, 0.0, 1.0, lo_open=True),
        stop=_stop(stop, limits),
        seed=None if seed is None else _int("seed", seed, -(2**63), 2**63 - 1),
        min_tokens=0 if min_tokens is None else _int("min_tokens", min_tokens, 0, max_out),
    )
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_ID):
        raise InvalidRequest(f"'user' must be a string of at most {MAX_USER_ID} characters", param="user")
    if session is not None and (not isinstance(session, str) or len(session) > MAX_USER_ID):
        raise InvalidRequest(f"the session id must be a string of at most {MAX_USER_ID} characters",
                             param="x-servoloop-session")
    if operation == "chat":
        msgs = _messages(messages, limits)
        text = ""
    else:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequest("'prompt' is required and must be a non-empty string", param="prompt")
        msgs, text = (), prompt
    return InferenceRequest(
        model=model, operation=operation, params=params, messages=msgs, prompt=text, stream=stream,
        use_cache=cache, user=user or "", session=session or "", traceparent=traceparent, deadline=deadline,
    )
