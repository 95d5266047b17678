"""TEST-ONLY: ClickHouse's HTTP interface in front of the real ClickHouse engine in chDB.

clickhouse-connect (and so `ClickHouseStore`) talks to this endpoint exactly as to a server: the SQL,
the insert bodies (Arrow, Native, ...), `database`, `default_format`, `param_*` and settings
parameters reach the engine; results and errors come back with the `X-ClickHouse-*` headers the
client reads. Nothing is emulated: every statement runs in chDB. No auth, no response compression,
one statement at a time (it shares the process's single `ChdbSession` with any `ChdbStore`).

Fault switches for fault tests: `outage()` refuses (HTTP 503) or drops every matching request while
it is on; `hold_insert()` stops one insert before (or after) the engine ran it, until released.

chDB allows one data path per process, so tests share one session: `shared_chdb_session()` and
`shared_endpoint()` return the process-wide instances (created on first use, closed at exit).
"""

from __future__ import annotations

import atexit
import gzip
import json
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from feedback.store.chdb import ChdbSession

# URL parameters that are HTTP-interface controls, not engine settings.
_CONTROL = frozenset({
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "compress", "decompress", "user", "password", "quota_key", "client_protocol_version", "buffer_size",
    "wait_end_of_query", "stacktrace", "role", "enable_http_compression", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
    "http_zlib_compression_level", "add_http_cors_header",
})
_INSERT = re.compile(rb"^\s*(INSERT\s+INTO\s+.+?)\s+FORMAT\s+([A-Za-z0-9_]+)[ \t]*(?:\r?\n)?", re.I | re.S)
_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.I)
_CODE = re.compile(r"Code: (\d+)")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _decompress(body: bytes, encoding: str | None) -> bytes:
    if not body or not encoding or encoding == "identity":
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "lz4":
        import lz4.frame

        return lz4.frame.decompress(body)
    if encoding == "zstd":
        try:
            from backports import zstd
        except ImportError:
            import zstandard as zstd  # type: ignore[no-redef]
        return zstd.decompress(body)
    if encoding == "br":
        import brotli

        return brotli.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding}")


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of a multipart/form-data or urlencoded body (clickhouse-connect sends long binds this way)."""
    if content_type.startswith("application/x-www-form-urlencoded"):
        return dict(parse_qsl(body.decode(), keep_blank_values=True))
    msg = BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    out = {}
    for part in msg.get_payload():  # type: ignore[union-attr]
        name = part.get_param("name", header="content-disposition")
        if name:
            out[str(name)] = part.get_payload(decode=True).decode()
    return out


class _Statement:
    """What one HTTP request asks of the engine."""

    def __init__(self, params: dict[str, str], body: bytes):
        self.database = params.get("database") or None
        self.query_params = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        self.settings = {k: v for k, v in params.items() if k not in _CONTROL and not k.startswith("param_")}
        self.insert_format: str | None = None
        self.data = b""
        # Like ClickHouse: the `query` parameter comes first, the body continues it (often as data).
        query = params.get("query", "").encode()
        text = query + b"\n" + body if query and body else query or body
        m = _INSERT.match(text)
        if m:
            self.sql, self.insert_format, self.data = m.group(1).decode(), m.group(2).decode(), text[m.end():]
        else:
            self.sql = text.decode()
        fmt = _FORMAT.search(self.sql) if self.insert_format is None else None
        self.output_format = fmt.group(1) if fmt else params.get("default_format", "TabSeparated")


def _execute(conn: Any, st: _Statement) -> tuple[bytes, dict[str, Any]]:
    """Run `st` on the chDB connection (on its thread): settings applied for this statement only."""
    saved: dict[str, str] = {}
    if st.settings:
        for name in st.settings:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"Code: 115. DB::Exception: Unknown setting '{name}'. (UNKNOWN_SETTING)")
        names = ", ".join("'" + n + "'" for n in st.settings)
        current = conn.query(f"SELECT name, value FROM system.settings WHERE name IN ({names})", "JSONCompact")
        now = {n: v for n, v in json.loads(current.bytes())["data"]}
        for name in st.settings:
            if name not in now:
                raise ValueError(f"Code: 115. DB::Exception: Unknown setting '{name}'. (UNKNOWN_SETTING)")
        for name, value in st.settings.items():
            if now[name] != value:  # only what differs, restored afterwards
                saved[name] = now[name]
                conn.query(f"SET {name} = {{v:String}}", "TabSeparated", params={"v": value})
    try:
        if st.insert_format is not None:
            inserter = conn.send_insert(st.sql, st.insert_format)
            if st.data:
                inserter.append(st.data)
            result = inserter.finish()
            return b"", {"written_rows": result.rows_written, "written_bytes": result.bytes_written,
                         "read_rows": 0, "read_bytes": 0, "result_rows": 0, "result_bytes": 0}
        res = conn.query(st.sql, st.output_format, params=st.query_params)
        out = res.bytes()
        return out, {"read_rows": res.rows_read(), "read_bytes": res.bytes_read(), "written_rows": 0,
                     "written_bytes": 0, "result_rows": 0, "result_bytes": len(out)}
    finally:
        for name, value in saved.items():
            conn.query(f"SET {name} = {{v:String}}", "TabSeparated", params={"v": value})


@dataclass
class Outage:
    """While on: every request for `database` (None: every request, pings included) is refused with
    `status` (mode `refuse`) or its connection closed without an answer (mode `drop`); `times` records each."""

    mode: Literal["refuse", "drop"]
    status: int = 503
    database: str | None = None
    times: list[float] = field(default_factory=list)  # time.monotonic() of each request it caught

    @property
    def hits(self) -> int:
        return len(self.times)

    def matches(self, database: str | None, sql: str) -> bool:
        return self.database is None or database == self.database or f"{self.database}." in sql


@dataclass
class InsertHold:
    """Holds the insert that comes after `after` matching ones (inserts into `database`'s `tables`),
    before the engine runs it (`executed=False`) or after (`executed=True`, only the reply waits).
    `held` is set once it waits; `release()` lets it go on, `release(refuse=True)` answers 503 instead
    (a request the engine never ran)."""

    database: str
    tables: Collection[str] | None = None
    after: int = 0
    executed: bool = False
    seen: int = 0
    held: threading.Event = field(default_factory=threading.Event)
    _go: threading.Event = field(default_factory=threading.Event)
    _refuse: bool = False

    def matches(self, sql: str) -> bool:
        m = _INSERT_TARGET.match(sql)
        if not m:
            return False
        database, _, table = m.group(1).replace("`", "").rpartition(".")
        return database == self.database and (self.tables is None or table in self.tables)

    def release(self, *, refuse: bool = False) -> None:
        self._refuse = refuse
        self._go.set()


_INSERT_TARGET = re.compile(r"^\s*INSERT\s+INTO\s+([`\w.]+)", re.I)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if urlsplit(self.path).path in ("/ping", "/"):
            if not urlsplit(self.path).query:
                if self._outage(None, ""):
                    return None
                return self._reply(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
        self._handle(b"")

    def do_POST(self) -> None:
        self._handle(self._read_body())

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, body: bytes) -> None:
        params = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        started = time.perf_counter_ns()
        try:
            body = _decompress(body, self.headers.get("Content-Encoding"))
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                params.update(_form_fields(ctype, body))
                body = b""
            st = _Statement(params, body)
            if self._outage(st.database, st.sql):
                return None
            hold = self.server.hold_for(st)
            if hold is not None and not hold.executed and self._wait(hold):
                return None
            out, summary = self.server.session.submit(lambda conn: _execute(conn, st), st.database).result()
            if hold is not None and hold.executed:
                self._wait(hold)
        except Exception as e:
            message = str(e)
            code = _CODE.search(message)
            return self._reply(500 if code else 400, (message.strip() + "\n").encode(), {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": code.group(1) if code else "62",
                "X-ClickHouse-Query-Id": query_id,
            })
        summary = {k: str(v) for k, v in summary.items()} | {"elapsed_ns": str(time.perf_counter_ns() - started)}
        self._reply(200, out, {
            "Content-Type": "application/octet-stream",
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Format": st.output_format,
            "X-ClickHouse-Timezone": "UTC",
            "X-ClickHouse-Server-Display-Name": "chdb",
            "X-ClickHouse-Summary": json.dumps(summary),
        })

    def _outage(self, database: str | None, sql: str) -> bool:
        """Apply an outage that covers this request; True when it was refused or dropped."""
        outage = self.server.outage
        if outage is None or not outage.matches(database, sql):
            return False
        outage.times.append(time.monotonic())
        if outage.mode == "drop":
            self.close_connection = True
            self.connection.shutdown(2)  # no answer at all: the client sees the connection die
        else:
            self._reply(outage.status, b"Code: 210. DB::Exception: the test switched this endpoint off.\n",
                        {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": "210"})
        return True

    def _wait(self, hold: InsertHold) -> bool:
        """Wait on a held insert; True when it was refused instead of let go."""
        hold.held.set()
        hold._go.wait(120)
        if hold._refuse:
            self._reply(503, b"Code: 210. DB::Exception: refused by the test.\n",
                        {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": "210"})
            return True
        return False

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client is gone (killed by a fault test): nobody to answer
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, session: ChdbSession):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.session = session
        self.outage: Outage | None = None
        self.holds: list[InsertHold] = []
        self._lock = threading.Lock()

    def hold_for(self, st: _Statement) -> InsertHold | None:
        """The hold that catches this insert, if any (each hold catches one: its `after + 1`-th match)."""
        if st.insert_format is None:
            return None
        with self._lock:
            for hold in self.holds:
                if hold.matches(st.sql):
                    hold.seen += 1
                    if hold.seen == hold.after + 1:
                        return hold
        return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client killed mid-request by a fault test is not an error of the endpoint
        super().handle_error(request, client_address)


class ClickHouseHTTPEndpoint:
    """A running endpoint on 127.0.0.1 at a free port, serving `session`. `url` is what clients connect to."""

    def __init__(self, session: ChdbSession):
        self._server = _Server(session)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="clickhouse-http", daemon=True)
        self._thread.start()

    @contextmanager
    def outage(self, mode: Literal["refuse", "drop"] = "refuse", *, status: int = 503,
               database: str | None = None) -> Iterator[Outage]:
        """The store is unavailable while in this block (see `Outage`); one outage at a time."""
        if self._server.outage is not None:
            raise RuntimeError("an outage is already on")
        outage = self._server.outage = Outage(mode, status, database)
        try:
            yield outage
        finally:
            self._server.outage = None

    @contextmanager
    def hold_insert(self, database: str, *, tables: Collection[str] | None = None, after: int = 0,
                    executed: bool = False) -> Iterator[InsertHold]:
        """Hold one insert (see `InsertHold`) while in this block; leaving it lets the insert go on."""
        hold = InsertHold(database, tables, after, executed)
        with self._server._lock:
            self._server.holds.append(hold)
        try:
            yield hold
        finally:
            with self._server._lock:
                self._server.holds.remove(hold)
            hold._go.set()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_shared: dict[str, Any] = {}
_lock = threading.Lock()


def shared_chdb_session() -> ChdbSession:
    """The process's one chDB session for tests (a temporary directory, removed at exit)."""
    with _lock:
        if "session" not in _shared:
            path = tempfile.mkdtemp(prefix="servoloop-chdb-")
            session = ChdbSession(path)
            _shared["session"] = session

            def cleanup() -> None:
                if "endpoint" in _shared:
                    _shared["endpoint"].close()
                session.close()
                shutil.rmtree(path, ignore_errors=True)

            atexit.register(cleanup)
        return _shared["session"]


def shared_endpoint() -> ClickHouseHTTPEndpoint:
    """The process's one HTTP endpoint, in front of `shared_chdb_session()`."""
    session = shared_chdb_session()
    with _lock:
        if "endpoint" not in _shared:
            _shared["endpoint"] = ClickHouseHTTPEndpoint(session)
        return _shared["endpoint"]
