"""The ClickHouse store: the `Store` seam, its two implementations, migrations, event writes and typed reads.

    store = await open_store(settings.events.store, data_dir=settings.data_dir)
    await migrate(store)
    await write_events(store, events)            # idempotent by event_id
    result = await ingest_batch(store, values)   # raw Kafka values -> tables + dead letters
    stats = await version_stats(store, start_ms=..., end_ms=...)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from feedback.settings import StoreSettings
from feedback.store.base import ParamValue, Store, StoreError, StoreUnavailable
from feedback.store.chdb import ChdbSession, ChdbStore
from feedback.store.clickhouse import ClickHouseStore
from feedback.store.migrate import MigrationError, applied_migrations, migrate
from feedback.store.queries import (
    RatedInference,
    VersionStats,
    count_rows,
    dead_letters,
    feedback_with_inferences,
    get_inference,
    get_inferences,
    inferences_in_window,
    latest,
    version_stats,
)
from feedback.store.writer import (
    IngestResult,
    PreparedBatch,
    decode_batch,
    ingest_batch,
    prepare_batch,
    write_events,
    write_prepared,
)
from schemas.errors import ConfigError

__all__ = [
    "ChdbSession", "ChdbStore", "ClickHouseStore", "IngestResult", "MigrationError", "ParamValue",
    "PreparedBatch", "RatedInference", "Store", "StoreError", "StoreUnavailable", "VersionStats",
    "applied_migrations", "count_rows", "dead_letters", "decode_batch", "feedback_with_inferences",
    "get_inference", "get_inferences", "inferences_in_window", "ingest_batch", "latest", "migrate",
    "open_store", "prepare_batch", "version_stats", "write_events", "write_prepared",
]


async def open_store(settings: StoreSettings, *, data_dir: Path) -> Store:
    """The configured store: chDB under `data_dir/chdb` (or `chdb_path`), or the ClickHouse server at `url`.

    Raises ConfigError for a clickhouse store without a url, StoreUnavailable if it cannot be opened
    (for chDB: another process holds the directory).
    """
    if settings.kind == "chdb":
        return await asyncio.to_thread(ChdbStore.open, settings.chdb_path or data_dir / "chdb", settings.database)
    if not settings.url:
        raise ConfigError("events.store.url is required when events.store.kind is 'clickhouse'")
    return await ClickHouseStore.connect(settings.url, settings.database, username=settings.username,
                                         password=settings.password)
