"""The distributed store: a ClickHouse server (or cluster) over HTTP with clickhouse-connect's async client.

Inserts go as Arrow (`insert_arrow`), results come back as Arrow (`query_arrow`), query parameters
bind server-side (`{name:Type}`), so this store and `ChdbStore` return the same tables for the same SQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from feedback.store.base import ParamValue, StoreError, StoreUnavailable, identifier

# Statements that return no rows go through `command` (query_arrow would append FORMAT to them).
_NO_ROWS = re.compile(
    r"^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|OPTIMIZE|INSERT|SET|USE|GRANT|REVOKE|SYSTEM|ATTACH|DETACH|KILL|DELETE|UPDATE)\b",
    re.IGNORECASE,
)

# Rows go in as given (see chdb.py): duplicates collapse at merge time and in FINAL/argMax reads.
_INSERT_SETTINGS = {"optimize_on_insert": 0}


def _translate(e: Exception) -> StoreError:
    import aiohttp
    from clickhouse_connect.driver.exceptions import OperationalError

    if isinstance(e, OperationalError | OSError | TimeoutError | aiohttp.ClientError):
        return StoreUnavailable(f"ClickHouse unavailable: {e}")
    code = getattr(e, "code", None)
    return StoreError(str(e), details={"clickhouse_code": code} if code else None)


class ClickHouseStore:
    """A `Store` on one database of a ClickHouse server, through an async clickhouse-connect client."""

    def __init__(self, client: Any, database: str):
        self._client = client
        self._database = identifier(database)
        self._closed = False

    @classmethod
    async def connect(cls, url: str, database: str = "servoloop", *, username: str = "default",
                      password: str = "", compress: bool | str = True, **client_args: Any) -> ClickHouseStore:
        """Connect to the server at `url` (http[s]://host:port) and create `database` if missing.

        Raises StoreUnavailable if the server cannot be reached, StoreError if it refuses.
        """
        import clickhouse_connect

        identifier(database)
        try:
            client = await clickhouse_connect.get_async_client(
                dsn=url, username=username, password=password, compress=compress, **client_args)
            await client.command(f"CREATE DATABASE IF NOT EXISTS {database}", use_database=False)
        except Exception as e:
            raise _translate(e) from e
        client.database = database
        return cls(client, database)

    @property
    def database(self) -> str:
        return self._database

    async def insert(self, table: str, data: pa.Table) -> int:
        if data.num_rows == 0:
            return 0
        self._check_open()
        try:
            await self._client.insert_arrow(identifier(table), data, database=self._database, settings=_INSERT_SETTINGS)
        except Exception as e:
            raise _translate(e) from e
        return data.num_rows

    async def query(self, sql: str, params: Mapping[str, ParamValue] | None = None) -> pa.Table:
        self._check_open()
        bound = {k: list(v) if isinstance(v, tuple) else v for k, v in (params or {}).items()}
        try:
            if _NO_ROWS.match(sql):
                await self._client.command(sql, parameters=bound or None)
                return pa.table({})
            return await self._client.query_arrow(sql, parameters=bound or None)
        except Exception as e:
            raise _translate(e) from e

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the ClickHouse store is closed")
