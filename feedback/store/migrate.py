"""Apply the numbered migrations in schemas/migrations to a store, each once, recorded in `_schema_migrations`."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from feedback.store.base import Store, StoreError
from schemas.errors import ErrorKind
from schemas.migrations import MIGRATIONS_TABLE, MIGRATIONS_TABLE_DDL, Migration, load_migrations


class MigrationError(StoreError):
    """An applied migration's file changed since it ran: the schema in the store is not what the code expects."""

    kind = ErrorKind.FAILED_PRECONDITION
    code = "migration_changed"


async def applied_migrations(store: Store) -> dict[int, str]:
    """Version -> checksum of every migration recorded in the store (empty before the first migrate)."""
    await store.query(MIGRATIONS_TABLE_DDL)
    table = await store.query(
        f"SELECT version, argMax(checksum, applied_at) AS checksum FROM {MIGRATIONS_TABLE} GROUP BY version")
    return dict(zip(table.column("version").to_pylist(), table.column("checksum").to_pylist(), strict=True))


async def migrate(store: Store, migrations: Sequence[Migration] | None = None) -> list[int]:
    """Bring the store's database to the latest schema; return the versions applied now (empty if current).

    Idempotent and safe to re-run after a crash mid-way (every statement is `IF NOT EXISTS`); two
    processes migrating at once only repeat idempotent statements. Raises MigrationError if a recorded
    migration's checksum differs from its file, StoreError/StoreUnavailable from the store.
    """
    migrations = load_migrations() if migrations is None else migrations
    applied = await applied_migrations(store)
    done = []
    for m in migrations:
        if m.version in applied:
            if applied[m.version] != m.checksum:
                raise MigrationError(f"migration {m.version:04d}_{m.name} changed after it was applied; "
                                     "add a new migration instead of editing a released one")
            continue
        for statement in m.statements:
            await store.query(statement)
        await store.insert(MIGRATIONS_TABLE, pa.table({
            "version": pa.array([m.version], pa.uint32()),
            "name": [m.name],
            "checksum": [m.checksum],
        }))
        done.append(m.version)
    return done
