"""The embedded store: ClickHouse in-process through chDB, one session per process, one thread for all calls.

chDB lets one process open one data path, and only one process may hold that path. So a process has
exactly one `ChdbSession`; every call goes through its single worker thread (serialized, and the event
loop never blocks on the engine, which releases the GIL while it works). Several `ChdbStore`s, one per
database, may share that session. Inserts hand the Arrow table to the engine by reference
(`INSERT … SELECT * FROM Python(table)`), the fastest path measured (see PLATFORM.md).
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from feedback.store.base import ParamValue, StoreError, StoreUnavailable, format_param, identifier

T = TypeVar("T")
# Rows go in as given: no merge pass over the block at insert time (for ReplacingMergeTree that pass
# costs ~60% of the insert). Duplicates collapse at merge time and in FINAL/argMax reads.
_INSERT_SETTINGS = "optimize_on_insert = 0"
_CODE = re.compile(r"Code: (\d+)")


def _store_error(e: Exception) -> StoreError:
    m = _CODE.search(str(e))
    return StoreError(str(e).strip(), details={"clickhouse_code": int(m.group(1))} if m else None)


class ChdbSession:
    """The process's chDB engine at `path`: a connection and the one thread every call runs on.

    Raises StoreUnavailable if the path is held by another process (or this process holds another path).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")
        self._holder: list[Any] = []  # the connection, while open (shared with the exit finalizer)
        self._closing = False
        self._databases: set[str] = set()
        try:
            self._executor.submit(self._open).result()
        except Exception as e:
            self._executor.shutdown(wait=False)
            raise StoreUnavailable(f"cannot open chDB at {self.path} (is another process using it?): {e}") from e
        # chDB crashes the interpreter at exit if a connection is still open: close it then at the latest.
        self._finalizer = weakref.finalize(self, _close_at_exit, self._executor, self._holder)

    def _open(self) -> None:
        import chdb  # imported here: loading the engine costs ~0.5 s, only the store's owner pays it

        self.path.mkdir(parents=True, exist_ok=True)
        self._holder.append(chdb.connect(str(self.path)))

    @property
    def closed(self) -> bool:
        return self._closing or not self._holder

    def submit(self, fn: Callable[[Any], T], database: str | None = None) -> Future[T]:
        """Run `fn(connection)` on the chDB thread, in `database` (created if missing) when given.

        Engine errors surface as StoreError; a closed session as StoreUnavailable.
        """

        def run() -> T:
            if not self._holder:
                raise StoreUnavailable("the chDB session is closed")
            conn = self._holder[0]
            try:
                if database is not None:
                    if database not in self._databases:
                        conn.query(f"CREATE DATABASE IF NOT EXISTS {identifier(database)}")
                        self._databases.add(database)
                    conn.query(f"USE {database}")
                return fn(conn)
            except StoreError:
                raise
            except Exception as e:
                if "UNKNOWN_DATABASE" in str(e):
                    self._databases.discard(database or "")
                raise _store_error(e) from None

        if self._closing:
            raise StoreUnavailable("the chDB session is closed")
        try:
            return self._executor.submit(run)
        except RuntimeError as e:  # executor shut down at interpreter exit
            raise StoreUnavailable("the chDB session is closed") from e

    async def run(self, fn: Callable[[Any], T], database: str | None = None) -> T:
        return await asyncio.wrap_future(self.submit(fn, database))

    def close(self) -> None:
        """Close the connection after the calls already queued; idempotent. Later calls raise StoreUnavailable."""
        if not self._closing:
            self._closing = True
            self._finalizer()


def _close_at_exit(executor: ThreadPoolExecutor, holder: list[Any]) -> None:
    def shut() -> None:
        if holder:
            holder.pop().close()

    try:
        executor.submit(shut).result()  # on the engine's thread, after the calls queued before
    except RuntimeError:  # interpreter exit already stopped the executor (and its thread): no race left
        shut()
    executor.shutdown(wait=True)


def _params(params: Mapping[str, ParamValue] | None) -> dict[str, str]:
    return {k: format_param(v) for k, v in (params or {}).items()}


class ChdbStore:
    """A `Store` over one database of a `ChdbSession`."""

    def __init__(self, session: ChdbSession, database: str = "servoloop", *, owns_session: bool = False):
        self._session = session
        self._database = identifier(database)
        self._owns_session = owns_session

    @classmethod
    def open(cls, path: str | Path, database: str = "servoloop") -> ChdbStore:
        """Open chDB at `path` (this process becomes its only user) as a store on `database`."""
        return cls(ChdbSession(path), database, owns_session=True)

    @property
    def database(self) -> str:
        return self._database

    @property
    def session(self) -> ChdbSession:
        return self._session

    def with_database(self, database: str) -> ChdbStore:
        """Another store on the same session (not owning it), bound to `database`."""
        return ChdbStore(self._session, database)

    async def insert(self, table: str, data: pa.Table) -> int:
        target = f"{self._database}.{identifier(table)}"
        columns = ", ".join(identifier(c) for c in data.column_names)

        def run(conn: Any) -> int:
            _sl_batch = data  # the engine resolves Python(_sl_batch) from this frame
            conn.query(f"INSERT INTO {target} ({columns}) SETTINGS {_INSERT_SETTINGS} SELECT * FROM Python(_sl_batch)")
            return data.num_rows

        if data.num_rows == 0:
            return 0
        return await self._session.run(run)

    async def query(self, sql: str, params: Mapping[str, ParamValue] | None = None) -> pa.Table:
        bound = _params(params)
        return await self._session.run(lambda conn: conn.query(sql, "ArrowTable", params=bound), self._database)

    async def aclose(self) -> None:
        if self._owns_session and not self._session.closed:
            await asyncio.to_thread(self._session.close)
