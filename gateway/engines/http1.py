"""A lean keep-alive HTTP/1.1 client for the remote engine's hot path.

General-purpose clients spend more CPU per request than the rest of the gateway together (cookie
jars, tracing hooks, per-request option objects). This one does only what talking to an
OpenAI-compatible upstream needs: a bounded pool of keep-alive connections per origin, one request
at a time per connection, bodies read whole or streamed as they arrive, parsed by `httptools`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

_EOF = object()


class UpstreamError(Exception):
    """The connection failed or the upstream broke the protocol."""


@dataclass(slots=True)
class _Exchange:
    """State of the one request in flight on a connection."""

    status: int = 0
    headers_done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    body: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    complete: bool = False
    got_bytes: bool = False


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"malformed HTTP response: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamError(f"connection closed by upstream{f': {exc}' if exc else ''}"))

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        if self.exchange is not None:
            self.exchange.status = self.parser.get_status_code()

    def on_headers_complete(self) -> None:
        ex = self.exchange
        self.keep_alive = self.parser.should_keep_alive()
        if ex is not None and not ex.headers_done.done():
            ex.headers_done.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.body.put_nowait(body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.complete = True
            ex.body.put_nowait(_EOF)

    def _fail(self, err: Exception) -> None:
        ex = self.exchange
        if ex is None or ex.complete:
            return
        if not ex.headers_done.done():
            ex.headers_done.set_exception(err)
        ex.body.put_nowait(err)
        ex.complete = True

    def start(self, payload: bytes) -> _Exchange:
        self.exchange = _Exchange()
        self.parser = httptools.HttpResponseParser(self)
        if self.closed or self.transport is None or self.transport.is_closing():
            self._fail(UpstreamError("connection already closed"))
        else:
            self.transport.write(payload)
        return self.exchange

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An upstream answer whose headers have arrived; read or stream the body, then release."""

    def __init__(self, pool: Http1Pool, conn: _Connection, ex: _Exchange):
        self._pool, self._conn, self._ex = pool, conn, ex
        self.status = ex.status
        self._released = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive. Raises UpstreamError if the connection breaks."""
        while True:
            item = await self._ex.body.get()
            if item is _EOF:
                self.release()
                return
            if isinstance(item, Exception):
                self.release()
                raise item
            yield item  # type: ignore[misc]

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def release(self) -> None:
        """Give the connection back (reusable only if the body was read to the end)."""
        if not self._released:
            self._released = True
            self._pool._release(self._conn, reusable=self._ex.complete and self._conn.keep_alive)


class Http1Pool:
    """Keep-alive connections to one origin, at most `max_connections` open at once."""

    def __init__(self, base_url: str, *, max_connections: int = 256, connect_timeout_s: float = 2.0,
                 default_headers: dict[str, str] | None = None):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self._ssl = ssl.create_default_context() if u.scheme == "https" else None
        self._connect_timeout = connect_timeout_s
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(max_connections)
        host_header = self.host if u.port is None else f"{self.host}:{u.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (default_headers or {}).items())
        self._fixed_headers = f"Host: {host_header}\r\nConnection: keep-alive\r\n{extra}".encode("latin-1")

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self._ssl)
        except (OSError, TimeoutError) as e:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {type(e).__name__}: {e}") from e
        return conn

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        conn.exchange = None
        if reusable and not conn.closed:
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    async def request(self, method: str, path: str, body: bytes, *, content_type: str = "application/json",
                      accept: str = "application/json") -> Response:
        """Send a request and wait for the response headers. Raises UpstreamError."""
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\nContent-Type: {content_type}\r\nAccept: {accept}\r\n"
                f"Content-Length: {len(body)}\r\n").encode("latin-1")
        payload = head + self._fixed_headers + b"\r\n" + body
        await self._slots.acquire()
        try:
            for attempt in (0, 1):
                while self._idle and self._idle[-1].closed:  # closed by the upstream while idle
                    self._idle.pop()
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                ex = conn.start(payload)
                try:
                    await ex.headers_done
                except UpstreamError:
                    conn.close()
                    # An idle keep-alive connection the upstream had already closed: nothing was
                    # processed, so sending once more on a fresh connection is safe.
                    if reused and not ex.got_bytes and attempt == 0:
                        continue
                    raise
                except BaseException:
                    conn.close()
                    raise
                return Response(self, conn, ex)
            raise AssertionError("unreachable")
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
