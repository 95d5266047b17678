"""OpenAI-compatible routes: a thin translation from JSON onto the core and back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse

from gateway.http.errors import error_payload, error_response
from gateway.request import Chunk, Completion, Operation
from gateway.service import Admission
from gateway.tracing import response_traceparent
from gateway.validation import make_request
from schemas.errors import InvalidRequest, PayloadTooLarge, ServoloopError
from schemas.openai import ChatCompletionRequest, CompletionRequest, usage_dict

if TYPE_CHECKING:
    from gateway.server import Gateway

_encode = msgspec.json.Encoder().encode
_SSE_DONE = b"data: [DONE]\n\n"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(payload), status_code=status, media_type="application/json", headers=headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing more than `max_bytes` before reading it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
    return bytes(body)


def parse(model: type[Any], body: bytes) -> Any:
    """Validate JSON against a wire type; raises InvalidRequest naming the field."""
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise InvalidRequest(f"request body is not valid JSON: {err['msg']}") from None
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, str) or p not in ("str", "list[TextPart]"))
        if err["type"] == "model_type" and not err["loc"]:
            raise InvalidRequest("request body must be a JSON object") from None
        raise InvalidRequest(f"'{loc}': {err['msg']}", param=loc or None) from None


def _deadline(request: Request) -> float | None:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise InvalidRequest("X-Request-Timeout must be a number of seconds", param="X-Request-Timeout") from None
    if not 0 < seconds <= 3600:
        raise InvalidRequest("X-Request-Timeout must be in (0, 3600] seconds", param="X-Request-Timeout")
    return time.monotonic() + seconds


def _headers(adm: Admission) -> dict[str, str]:
    return {"x-servoloop-inference-id": adm.id, "x-servoloop-model-version": adm.model_version,
            "traceparent": response_traceparent(adm)}


def _failed(err: ServoloopError, adm: Admission) -> Response:
    """The error response of an admitted request: it still names the trace to look the failure up by."""
    response = error_response(err)
    response.headers["traceparent"] = response_traceparent(adm)
    return response


Handler = Callable[[Request], Awaitable[Response]]


def build_router(gw: Gateway) -> tuple[APIRouter, dict[tuple[str, str], Handler]]:
    """The OpenAI routes, and the same handlers keyed by (method, path) for the ASGI fast path."""
    api = APIRouter()
    service, limits = gw.service, gw.settings.limits

    def admit(request: Request, body: bytes, operation: Operation) -> tuple[Admission, Any]:
        principal = gw.auth.authenticate(request.headers.get("authorization"))
        wire = parse(ChatCompletionRequest if operation == "chat" else CompletionRequest, body)
        if wire.n not in (None, 1):
            raise InvalidRequest("'n' must be 1: one choice per request is supported", param="n")
        max_tokens = wire.max_tokens
        if operation == "chat":
            max_tokens = wire.max_completion_tokens if wire.max_completion_tokens is not None else max_tokens
        req = make_request(
            limits=limits, model=wire.model, operation=operation,
            messages=[(m.role, m.text()) for m in wire.messages] if operation == "chat" else (),
            prompt=wire.prompt_text() if operation == "text_completion" else None,
            max_tokens=max_tokens, temperature=wire.temperature, top_p=wire.top_p, stop=wire.stop,
            seed=wire.seed, min_tokens=wire.min_tokens, stream=wire.stream, cache=bool(wire.servoloop and wire.servoloop.cache),
            user=wire.user, session=request.headers.get("x-servoloop-session"),
            traceparent=request.headers.get("traceparent", ""), deadline=_deadline(request),
        )
        return service.admit(principal, req, api="http"), wire

    async def handle(request: Request, operation: Operation) -> Response:
        body = await read_body(request, limits.max_request_bytes)
        adm, wire = admit(request, body, operation)
        if not wire.stream:
            try:
                completion = await service.complete(adm)
            except ServoloopError as e:
                return _failed(e, adm)
            return json_response(_full(completion, operation, adm), headers=_headers(adm))
        include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
        chunks = service.run(adm)
        try:  # wait for the first chunk, so failures before any token still get a proper status code
            first = await anext(chunks)
        except ServoloopError as e:
            await chunks.aclose()
            return _failed(e, adm)
        except BaseException:
            await chunks.aclose()
            raise
        return StreamingResponse(_sse(first, chunks, adm, operation, include_usage), media_type="text/event-stream",
                                 headers={**_headers(adm), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest), tags=["openai"])
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat")

    @api.post("/v1/completions", openapi_extra=body_schema(CompletionRequest), tags=["openai"])
    async def completions(request: Request) -> Response:
        return await handle(request, "text_completion")

    @api.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> Response:
        gw.auth.authenticate(request.headers.get("authorization"))
        data = [{"id": r.name, "object": "model", "created": gw.started_at, "owned_by": "servoloop",
                 "servoloop": {"engine": r.engine.kind, "version": r.version}} for r in service.router.routes()]
        return json_response({"object": "list", "data": data})

    return api, {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/v1/completions"): completions,
                 ("GET", "/v1/models"): models}


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def body_schema(model: type[Any]) -> dict[str, Any]:
    """The OpenAPI requestBody of a JSON model, with pydantic's `$defs` inlined.

    Left in place, `#/$defs/...` would point at the root of the OpenAPI document, where nothing is: clients and
    schema tools (schemathesis found it) could not resolve the nested types. The models are not recursive.
    """
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline_refs(schema, schema.get("$defs", {}))}}}}



def _full(c: Completion, operation: Operation, adm: Admission) -> dict[str, Any]:
    if operation == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": c.text},
                                  "finish_reason": c.finish_reason, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": c.id, "object": obj, "created": c.created, "model": c.model, "choices": [choice],
            "usage": usage_dict(c.usage.prompt_tokens, c.usage.completion_tokens),
            "system_fingerprint": c.model_version}


async def _sse(first: Chunk, rest: AsyncIterator[Chunk], adm: Admission, operation: Operation,
               include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format; an error mid-stream becomes a final error event."""
    created = int(time.time())
    base = {"id": adm.id, "object": "chat.completion.chunk" if operation == "chat" else "text_completion",
            "created": created, "model": adm.request.model, "system_fingerprint": adm.model_version}
    role_sent = False

    def event(chunk: Chunk) -> bytes:
        nonlocal role_sent
        if operation == "chat":
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text or not chunk.finish_reason else {}
            if not role_sent:
                delta = {"role": "assistant", **delta}
                role_sent = True
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": chunk.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason, "logprobs": None}
        payload: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return b"data: " + _encode(payload) + b"\n\n"

    try:
        chunk: Chunk | None = first
        while chunk is not None:
            yield event(chunk)
            if chunk.finish_reason and include_usage and chunk.usage:
                u = chunk.usage
                yield b"data: " + _encode({**base, "choices": [], "usage": usage_dict(u.prompt_tokens, u.completion_tokens)}) + b"\n\n"
            chunk = await anext(rest, None)
        yield _SSE_DONE
    except ServoloopError as e:
        yield b"data: " + _encode(error_payload(e)) + b"\n\n"
        yield _SSE_DONE
    finally:
        await rest.aclose()
