"""A small real OpenAI-compatible HTTP server with fixed latency: the stand-in for a remote engine fleet.

Used by the remote-engine and fallback tests and by benchmarks/gateway_overhead.py. It answers
/v1/chat/completions and /v1/completions (stream or not) with `tokens` words after `latency_ms`,
streaming one word every `token_interval_ms`; `fail_status` makes it answer every request with that
HTTP status instead. Run alone: `python -m tests.support.openai_upstream --port 9000 --latency-ms 20`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class UpstreamBehaviour:
    latency_ms: float = 0.0
    tokens: int = 8
    token_interval_ms: float = 0.0
    fail_status: int | None = None
    reply: str | None = None  # answer with this text instead of numbered words
    chunk_chars: int = 0  # stream `reply` in pieces of this many characters (0: word by word)
    requests: int = 0
    last_body: dict = field(default_factory=dict)
    cancelled: int = 0


def _text(n: int) -> list[str]:
    return [f"w{i} " for i in range(n)]


def build_app(b: UpstreamBehaviour) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        b.requests += 1
        body = await request.json()
        b.last_body = body
        if b.fail_status:
            return web.json_response({"error": {"message": "upstream failure (test)", "code": "boom"}},
                                     status=b.fail_status)
        chat = request.path.endswith("chat/completions")
        n = min(int(body.get("max_tokens") or b.tokens), b.tokens)
        words = _text(n)
        if b.reply is not None:
            step = b.chunk_chars
            words = [b.reply[i:i + step] for i in range(0, len(b.reply), step)] if step else \
                [w + " " for w in b.reply.split(" ")]
            n = len(words)
        if b.latency_ms:
            await asyncio.sleep(b.latency_ms / 1000)
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        base = {"id": "up-1", "created": int(time.time()), "model": body.get("model", "")}
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": "".join(words), "finish_reason": "length"})
            return web.json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, w in enumerate(words):
                if b.token_interval_ms and i:
                    await asyncio.sleep(b.token_interval_ms / 1000)
                choice = {"index": 0, "delta": {"content": w}, "finish_reason": None} if chat else \
                         {"index": 0, "text": w, "finish_reason": None}
                await resp.write(b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n")
            last = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else \
                   {"index": 0, "text": "", "finish_reason": "length"}
            await resp.write(b"data: " + json.dumps({**base, "choices": [last]}).encode() + b"\n\n")
            await resp.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            b.cancelled += 1
            raise
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fixed", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/completions", handle)
    return app


class RunningUpstream:
    """Serve the app on 127.0.0.1 in the current event loop."""

    def __init__(self, behaviour: UpstreamBehaviour | None = None):
        self.behaviour = behaviour or UpstreamBehaviour()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, port: int = 0) -> RunningUpstream:
        self._runner = web.AppRunner(build_app(self.behaviour), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--token-interval-ms", type=float, default=0.0)
    a = ap.parse_args()
    b = UpstreamBehaviour(latency_ms=a.latency_ms, tokens=a.tokens, token_interval_ms=a.token_interval_ms)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(build_app(b), host="127.0.0.1", port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
