"""`servoloop db …`: migrate the event store, show its state, tail its tables.

With the embedded store (chDB) only one process may open the data directory: while `servoloop up`
runs, these commands get a clear "store unavailable" error instead of a second, conflicting owner.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

app = typer.Typer(help="The event store: migrations, row counts, recent rows.", no_args_is_help=True)
console = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]


def _with_store(config: Path | None, work: Callable[[Any], Awaitable[T]]) -> T:
    from feedback.store import open_store
    from servoloop.settings import load_settings

    settings = load_settings(config)

    async def run() -> T:
        store = await open_store(settings.events.store, data_dir=settings.data_dir)
        try:
            return await work(store)
        finally:
            await store.aclose()

    return asyncio.run(run())


@app.command()
def migrate(config: ConfigOpt = None) -> None:
    """Create or upgrade the event tables (idempotent: applies only what is missing)."""
    from feedback.store import migrate as apply

    applied = _with_store(config, apply)
    console.print(f"[green]applied migrations {applied}[/green]" if applied else "schema is up to date")


@app.command()
def status(config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Applied migrations and the exact number of events per table."""
    from feedback.store import applied_migrations, count_rows
    from schemas.events import EVENT_TYPES

    async def work(store: Any) -> dict[str, Any]:
        return {"database": store.database,
                "migrations": sorted(await applied_migrations(store)),
                "rows": {t.table: await count_rows(store, t.table) for t in EVENT_TYPES}}

    info = _with_store(config, work)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console.print(f"database {info['database']}, migrations {info['migrations']}")
    for table, n in info["rows"].items():
        print(f"{table:20s} {n:>12,}")


@app.command()
def tail(table: Annotated[str, typer.Argument(help="inferences, feedback, guardrail_verdicts, dead_letters, …")],
         n: Annotated[int, typer.Option("-n", help="how many rows")] = 20,
         tenant: Annotated[str | None, typer.Option(help="only this tenant's rows")] = None,
         config: ConfigOpt = None) -> None:
    """Print the newest rows of a table as JSON lines, newest first."""
    from feedback.store import latest
    from schemas.events import EVENT_TYPES

    tables = {t.table for t in EVENT_TYPES}
    if table not in tables:
        raise typer.BadParameter(f"unknown table {table!r}; one of {sorted(tables)}")
    for row in _with_store(config, lambda store: latest(store, table, limit=n, tenant=tenant)):
        print(json.dumps(row, default=_json_default, ensure_ascii=False))


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
