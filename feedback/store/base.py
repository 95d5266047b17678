"""The `Store` seam: insert Arrow tables, run SQL, get Arrow tables back. Two real implementations.

`ChdbStore` (feedback/store/chdb.py) runs ClickHouse in-process; `ClickHouseStore`
(feedback/store/clickhouse.py) talks to a server over HTTP. Both speak the same SQL and the same DDL.
A store is bound to one database: unqualified table names in SQL resolve there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import pyarrow as pa

from schemas.errors import ErrorKind, ServoloopError

ParamValue = str | int | float | Sequence[str] | Sequence[int]
"""Query parameters fill `{name:Type}` placeholders server-side (never string-formatted into SQL).

Times travel as epoch milliseconds: `fromUnixTimestamp64Milli({start:Int64}, 'UTC')`.
"""


class StoreError(ServoloopError):
    """The store rejected a statement (bad SQL, type mismatch, missing table). Retrying will not help."""

    kind = ErrorKind.INTERNAL
    code = "store_error"


class StoreUnavailable(StoreError):
    """The store could not be reached or is closed. Safe to retry later: writes are idempotent."""

    kind = ErrorKind.UNAVAILABLE
    code = "store_unavailable"


@runtime_checkable
class Store(Protocol):
    """Append-only access to one ClickHouse database."""

    @property
    def database(self) -> str: ...

    async def insert(self, table: str, data: pa.Table) -> int:
        """Append `data` (columns named as in `table`; others get their defaults). Returns rows written.

        Rows go in as given, duplicates included: they collapse at merge time and in FINAL/argMax reads.

        Raises StoreError if rejected, StoreUnavailable if the store cannot be reached.
        """
        ...

    async def query(self, sql: str, params: Mapping[str, ParamValue] | None = None) -> pa.Table:
        """Run a statement and return its result as Arrow (empty, no columns, for DDL).

        Raises StoreError if rejected, StoreUnavailable if the store cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release the connection (idempotent); later calls raise StoreUnavailable."""
        ...


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")



def in_ids(param: str) -> str:
    """The right side of `x IN ...` for an Array(String) parameter that may be long (thousands of ids).

    A subquery over the array, not the array itself: ClickHouse (chDB 25.x) took 96 s to evaluate
    `event_id IN {ids:Array(String)}` with 100k ids against 140k rows, and 0.1 s as `IN (SELECT arrayJoin(...))`
    (10k ids: the same either way).
    """
    return f"(SELECT arrayJoin({{{param}:Array(String)}}))"

def identifier(name: str) -> str:
    """`name` if it is a plain SQL identifier (safe to place in SQL); raise StoreError otherwise."""
    if not _IDENTIFIER.match(name):
        raise StoreError(f"not a plain identifier: {name!r}")
    return name


def _escape(value: str) -> str:
    # ClickHouse parses parameter values in its escaped text format (the same as clickhouse-connect sends).
    return "".join("\\" + c if c in "\\'`\t\n" else c for c in value)


def format_param(value: ParamValue) -> str:
    """A parameter value as ClickHouse's `param_<name>` text (what the HTTP interface receives)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, int | float):
        return repr(value)
    items = ", ".join("'" + _escape(v) + "'" if isinstance(v, str) else repr(v) for v in value)
    return f"[{items}]"
