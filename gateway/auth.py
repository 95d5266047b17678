"""API keys: shown once at creation, stored only as salted hashes, each bound to a tenant and scopes.

`KeyStore` is the SQLite file the CLI writes (`servoloop keys create|list|revoke`); every gateway
holds an in-memory snapshot (`Authenticator`) refreshed in the background, so checking a key on the
request path is a dict lookup and one constant-time hash comparison — never a disk read.
Key format: `sl-<key id, 12 hex>-<secret, 43 url-safe chars>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.limits import KeyLimits, RateLimiter
from schemas.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)
Scope = Literal["infer", "feedback", "admin"]
SCOPES: frozenset[str] = frozenset({"infer", "feedback", "admin"})
_PREFIX = "sl"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
  key_id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  tenant TEXT NOT NULL,
  scopes TEXT NOT NULL,
  salt BLOB NOT NULL,
  secret_hash BLOB NOT NULL,
  rpm INTEGER, tpm INTEGER, max_streams INTEGER,
  cache INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL,
  revoked_at REAL
);
CREATE TABLE IF NOT EXISTS key_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL);
"""


def _hash(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def parse_key(raw: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    parts = raw.split("-", 2)
    if len(parts) != 3 or parts[0] != _PREFIX or len(parts[1]) != 12 or not parts[2]:
        return None
    return parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    name: str
    tenant: str
    scopes: frozenset[str]
    salt: bytes
    secret_hash: bytes
    rpm: int | None
    tpm: int | None
    max_streams: int | None
    cache: bool
    created_at: float
    revoked_at: float | None

    def public(self) -> dict[str, object]:
        """What `keys list` may show: never the hash or salt."""
        return {"key_id": self.key_id, "name": self.name, "tenant": self.tenant, "scopes": sorted(self.scopes),
                "rpm": self.rpm, "tpm": self.tpm, "max_streams": self.max_streams, "cache": self.cache,
                "created_at": self.created_at, "revoked": self.revoked_at is not None}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from a valid key."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    limits: KeyLimits
    cache: bool

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise PermissionDenied(f"this key lacks the {scope!r} scope (it has: {', '.join(sorted(self.scopes))})")


class KeyStore:
    """The durable key table (SQLite; safe for several processes). Blocking: call off the event loop."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def create(self, tenant: str, scopes: Iterable[str], *, name: str = "", rpm: int | None = None,
               tpm: int | None = None, max_streams: int | None = None, cache: bool = False) -> tuple[str, str]:
        """Create a key; returns (key id, the full key). The full key is not stored and cannot be shown again."""
        scopes = frozenset(scopes)
        if not tenant or len(tenant) > 128:
            raise InvalidRequest("tenant must be 1-128 characters")
        if not scopes or not scopes <= SCOPES:
            raise InvalidRequest(f"scopes must be a non-empty subset of {sorted(SCOPES)}; got {sorted(scopes)}")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL)",
                (key_id, name, tenant, ",".join(sorted(scopes)), salt, _hash(salt, secret), rpm, tpm, max_streams,
                 int(cache), time.time()),
            )
            db.execute("INSERT INTO key_changes (at) VALUES (?)", (time.time(),))
        return key_id, f"{_PREFIX}-{key_id}-{secret}"

    def revoke(self, key_id: str) -> None:
        """Revoke a key; gateways refuse it within their reload interval. Raises NotFound."""
        with self._connect() as db:
            cur = db.execute("UPDATE api_keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL",
                             (time.time(), key_id))
            if cur.rowcount == 0:
                raise NotFound(f"no active key with id {key_id!r}")
            db.execute("INSERT INTO key_changes (at) VALUES (?)", (time.time(),))

    def version(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COALESCE(MAX(seq), 0) FROM key_changes").fetchone()[0]

    def records(self) -> list[KeyRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [KeyRecord(r[0], r[1], r[2], frozenset(r[3].split(",")), r[4], r[5], r[6], r[7], r[8], bool(r[9]),
                          r[10], r[11]) for r in rows]


class Authenticator:
    """Checks bearer keys against an in-memory snapshot of the key store."""

    def __init__(self, store: KeyStore, limiter: RateLimiter, *, reload_interval_s: float = 1.0):
        self._store = store
        self._limiter = limiter
        self._interval = reload_interval_s
        self._keys: dict[str, KeyRecord] = {}
        self._version = -1
        self._task: asyncio.Task[None] | None = None
        self.reload()

    def reload(self) -> bool:
        """Re-read the store if it changed (blocking). Returns True when the snapshot changed."""
        version = self._store.version()
        if version == self._version:
            return False
        self._keys = {r.key_id: r for r in self._store.records() if r.revoked_at is None}
        self._version = version
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reload_forever(), name="key-reloader")

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await asyncio.to_thread(self.reload):
                    log.info("API keys reloaded: %d active", len(self._keys))
            except Exception:
                log.exception("reloading API keys failed; keeping the previous snapshot")

    def authenticate(self, authorization: str | None) -> Principal:
        """Principal for an `Authorization: Bearer <key>` value; raises Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, raw = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise Unauthenticated("malformed Authorization header: expected 'Bearer <key>'")
        parsed = parse_key(raw.strip())
        record = self._keys.get(parsed[0]) if parsed else None
        # Compare even when the id is unknown, so timing does not reveal which key ids exist.
        salt, expected = (record.salt, record.secret_hash) if record else (b"\0" * 16, b"\0" * 32)
        ok = hmac.compare_digest(_hash(salt, parsed[1] if parsed else raw), expected)
        if record is None or not ok:
            raise Unauthenticated("invalid or revoked API key")
        return Principal(record.key_id, record.tenant, record.scopes,
                         self._limiter.limits_for(record.rpm, record.tpm, record.max_streams), record.cache)
