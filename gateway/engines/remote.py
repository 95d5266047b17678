"""Any OpenAI-compatible upstream (a vLLM server fleet, another gateway) over one pooled HTTP client.

Connection errors, timeouts, upstream 429 and 5xx raise EngineUnavailable so the router can fall back;
other upstream 4xx are the caller's fault and raise InvalidRequest with the upstream's message.
Prompt tokens are estimated (≈4 characters a token) until the upstream reports real usage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from gateway.engines import collect
from gateway.engines.http1 import Http1Pool, Response, UpstreamError
from gateway.request import Chunk, InferenceRequest, Usage
from gateway.settings import ModelSettings
from schemas.errors import EngineUnavailable, InvalidRequest, NotFound

log = logging.getLogger(__name__)
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


def estimate_tokens(request: InferenceRequest) -> int:
    if request.operation == "text_completion":
        return max(1, len(request.prompt) // 4)
    return sum(4 + len(m.content) // 4 for m in request.messages) + 2


def upstream_body(request: InferenceRequest, model: str, *, stream: bool) -> dict[str, Any]:
    """The OpenAI request body for the upstream (pure)."""
    p = request.params
    body: dict[str, Any] = {"model": model, "max_tokens": p.max_tokens, "temperature": p.temperature,
                            "top_p": p.top_p, "stream": stream}
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    if p.min_tokens:
        body["min_tokens"] = p.min_tokens  # vLLM's OpenAI server extension
    if stream:
        body["stream_options"] = {"include_usage": True}
    if request.operation == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = request.prompt
    return body


def _choice_text(choice: dict[str, Any], *, delta: bool) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    message = choice.get("delta" if delta else "message") or {}
    return message.get("content") or ""


def _usage(data: dict[str, Any] | None) -> Usage | None:
    if not data:
        return None
    return Usage(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0)))


class RemoteEngine:
    kind = "remote"

    def __init__(self, settings: ModelSettings):
        assert settings.url
        self._settings = settings
        self._base = settings.url.rstrip("/")
        self._model = settings.upstream_model or settings.name
        self._headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._pool: Http1Pool | None = None
        self._adapters: dict[str, str] = {}

    async def start(self) -> None:
        s = self._settings
        self._pool = Http1Pool(self._base, max_connections=s.max_connections, connect_timeout_s=s.connect_timeout_s,
                               default_headers=self._headers)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def count_prompt_tokens(self, request: InferenceRequest) -> int:
        return estimate_tokens(request)

    @staticmethod
    def _path(request: InferenceRequest) -> str:
        return "/chat/completions" if request.operation == "chat" else "/completions"

    def _target(self, adapter: str | None) -> str:
        if adapter is None:
            return self._model
        if adapter not in self._adapters:
            raise NotFound(f"adapter {adapter!r} is not loaded", param="model")
        return adapter  # vLLM serves a runtime-loaded LoRA under its own name

    def _timeout(self, request: InferenceRequest | None) -> float:
        left = request.time_left() if request is not None else None
        return self._settings.timeout_s if left is None else max(0.0, min(left, self._settings.timeout_s))

    async def _post(self, path: str, body: dict[str, Any], *, stream: bool = False) -> Response:
        """POST and wait for the status; maps transport failures and upstream statuses to our errors."""
        if self._pool is None:
            raise EngineUnavailable("remote engine is not started")
        try:
            resp = await self._pool.request("POST", path, _json_encode(body),
                                            accept="text/event-stream" if stream else "application/json")
        except UpstreamError as e:
            raise EngineUnavailable(f"upstream {self._base} unreachable: {e}") from e
        if resp.status >= 400:
            try:
                text = (await resp.read())[:2000].decode(errors="replace")
            except UpstreamError:
                text = ""
            if resp.status == 429 or resp.status >= 500:
                raise EngineUnavailable(f"upstream {self._base} answered {resp.status}: {text}")
            if resp.status == 404 and path.endswith("_lora_adapter"):
                raise NotFound(f"upstream {self._base}: {text}")
            raise InvalidRequest(f"upstream refused the request ({resp.status}): {text}")
        return resp

    async def generate(self, request: InferenceRequest, *, adapter: str | None = None) -> Chunk:
        if request.stream:
            return await collect(self.stream(request, adapter=adapter))
        body = upstream_body(request, self._target(adapter), stream=False)
        try:
            async with asyncio.timeout(self._timeout(request)):
                resp = await self._post(self._path(request), body)
                raw = await resp.read()
        except TimeoutError:
            raise EngineUnavailable(f"upstream {self._base} timed out") from None
        except UpstreamError as e:
            raise EngineUnavailable(f"upstream {self._base} broke the connection: {e}") from e
        try:
            data = _json_decode(raw)
            choice = data["choices"][0]
        except (msgspec.DecodeError, KeyError, IndexError, TypeError) as e:
            raise EngineUnavailable(f"upstream {self._base} sent a malformed answer: {e}") from e
        usage = _usage(data.get("usage")) or Usage(estimate_tokens(request), 0)
        return Chunk(_choice_text(choice, delta=False), choice.get("finish_reason") or "stop", usage)

    async def stream(self, request: InferenceRequest, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        body = upstream_body(request, self._target(adapter), stream=True)
        try:
            async with asyncio.timeout(self._timeout(request)):
                resp = await self._post(self._path(request), body, stream=True)
        except TimeoutError:
            raise EngineUnavailable(f"upstream {self._base} timed out") from None
        finish: Any = None
        usage: Usage | None = None
        n_chunks = 0
        buffer = b""
        try:
            async with asyncio.timeout(self._timeout(request)):
                async for data in resp.chunks():
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    for raw in lines:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        event = _json_decode(payload)
                        usage = _usage(event.get("usage")) or usage
                        for choice in event.get("choices") or ():
                            if text := _choice_text(choice, delta=True):
                                n_chunks += 1
                                yield Chunk(text)
                            finish = choice.get("finish_reason") or finish
        except TimeoutError:
            raise EngineUnavailable(f"upstream {self._base} stream timed out") from None
        except (UpstreamError, msgspec.DecodeError, AttributeError) as e:
            raise EngineUnavailable(f"upstream {self._base} stream broke: {type(e).__name__}: {e}") from e
        finally:
            resp.release()  # before the end of the body this closes the connection: the upstream aborts
        yield Chunk("", finish or "stop", usage or Usage(estimate_tokens(request), n_chunks))

    async def load_adapter(self, name: str, path: str) -> None:
        if self._adapters.get(name) == path:
            return
        body = {"lora_name": name, "lora_path": path, "load_inplace": name in self._adapters}
        await (await self._post("/load_lora_adapter", body)).read()
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise NotFound(f"adapter {name!r} is not loaded")
        await (await self._post("/unload_lora_adapter", {"lora_name": name})).read()
