"""ClickHouse DDL as numbered migrations: `NNNN_name.sql` files, each a list of idempotent statements.

Statements end with `;` at the end of a line; `--` comment lines are dropped. A file, once released,
never changes (its checksum is recorded when applied); schema changes go into a new, higher-numbered
file using `IF NOT EXISTS` forms (`ALTER TABLE … ADD COLUMN IF NOT EXISTS …`). Tables are unqualified:
the applier runs them in the store's database. The same SQL runs on chDB and on a ClickHouse server.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ConfigError

MIGRATIONS_DIR = Path(__file__).resolve().parent
MIGRATIONS_TABLE = "_schema_migrations"
MIGRATIONS_TABLE_DDL = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
"""

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    checksum: str


def split_statements(sql: str) -> tuple[str, ...]:
    """The statements of a migration file, comments and blank lines dropped."""
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    parts = re.split(r";[ \t]*(?:\n|$)", "\n".join(lines))
    return tuple(p.strip() for p in parts if p.strip())


def load_migrations(directory: Path = MIGRATIONS_DIR) -> tuple[Migration, ...]:
    """Every migration in `directory`, by version. Raises ConfigError on a misnamed or duplicate file."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _FILE.match(path.name)
        if not m:
            raise ConfigError(f"migration file {path.name} must be named NNNN_lowercase_name.sql")
        version = int(m.group(1))
        if version in found:
            raise ConfigError(f"two migrations share version {version}: {found[version].name}, {m.group(2)}")
        text = path.read_text()
        found[version] = Migration(version, m.group(2), split_statements(text),
                                   hashlib.sha256(text.encode()).hexdigest())
    return tuple(found[v] for v in sorted(found))
