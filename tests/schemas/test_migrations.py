"""Migration files: numbered, parsed into single statements, checksummed (applying them: tests/feedback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import ConfigError
from schemas.migrations import load_migrations, split_statements


def test_released_migrations_are_numbered_from_one_without_gaps() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_every_statement_is_idempotent_by_construction() -> None:
    for m in load_migrations():
        for statement in m.statements:
            head = " ".join(statement.split()[:8]).upper()
            assert "IF NOT EXISTS" in head or "IF EXISTS" in head, f"{m.name}: {head}"


def test_statements_split_on_line_ending_semicolons_and_drop_comments() -> None:
    sql = "-- a comment; not a statement\nCREATE TABLE a (x String DEFAULT ';');\n\nSELECT 1;  \nSELECT 2"
    assert split_statements(sql) == ("CREATE TABLE a (x String DEFAULT ';')", "SELECT 1", "SELECT 2")


def test_checksums_change_when_a_file_changes(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE IF NOT EXISTS a (x UInt8) ENGINE = Memory;\n")
    first = load_migrations(tmp_path)[0].checksum
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE IF NOT EXISTS a (x UInt16) ENGINE = Memory;\n")
    assert load_migrations(tmp_path)[0].checksum != first


@pytest.mark.parametrize("names", [["1_a.sql"], ["0001_A.sql"], ["0001_a.sql", "0001_b.sql"]])
def test_misnamed_or_duplicate_migration_files_are_refused(tmp_path: Path, names: list[str]) -> None:
    for n in names:
        (tmp_path / n).write_text("SELECT 1;\n")
    with pytest.raises(ConfigError):
        load_migrations(tmp_path)
