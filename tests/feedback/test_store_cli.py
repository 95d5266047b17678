"""`servoloop db`: migrate, status and tail against a real embedded store (a subprocess: chDB's one-path rule)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from schemas.migrations import load_migrations


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SERVOLOOP_DATA_DIR": str(data_dir)}
    env.pop("SERVOLOOP_CONFIG", None)
    return subprocess.run([sys.executable, "-c", "from servoloop.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_db_migrate_creates_the_tables_and_status_reports_every_table(tmp_path: Path) -> None:
    first = cli(tmp_path, "db", "migrate")
    assert first.returncode == 0, first.stderr
    versions = [m.version for m in load_migrations()]
    assert f"applied migrations {versions}" in first.stderr
    status = cli(tmp_path, "db", "status", "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["migrations"] == versions and info["rows"]["inferences"] == 0 and "dead_letters" in info["rows"]
    assert cli(tmp_path, "db", "tail", "no_such_table").returncode != 0
