"""The `servoloop` command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVOLOOP = str(Path(sys.executable).parent / "servoloop")


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SERVOLOOP, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=check,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.mark.parametrize("args", [[], ["keys"], ["model"], ["config"], ["up"], ["serve"], ["keys", "create"]])
def test_every_command_has_help(tmp_path: Path, args: list[str]) -> None:
    r = cli(*args, "--help", cwd=tmp_path)
    assert "Usage" in r.stdout


def test_keys_create_list_revoke_round_trip(tmp_path: Path) -> None:
    created = cli("keys", "create", "--tenant", "acme", "--scope", "infer", "--rpm", "5", cwd=tmp_path)
    key = created.stdout.strip().splitlines()[-1]
    key_id = key.split("-")[1]

    listed = json.loads(cli("keys", "list", "--json", cwd=tmp_path).stdout)
    cli("keys", "revoke", key_id, cwd=tmp_path)
    after = json.loads(cli("keys", "list", "--json", cwd=tmp_path).stdout)

    assert key.startswith("sl-")
    assert listed == [{**listed[0], "key_id": key_id, "tenant": "acme", "scopes": ["infer"], "rpm": 5, "revoked": False}]
    assert key.split("-", 2)[2] not in json.dumps(listed)  # the secret is never shown again
    assert after[0]["revoked"] is True
    assert (tmp_path / ".servoloop" / "keys.sqlite").exists()


def test_cli_errors_are_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    bad_scope = cli("keys", "create", "--tenant", "acme", "--scope", "root", cwd=tmp_path, check=False)
    unknown = cli("keys", "revoke", "ffffffffffff", cwd=tmp_path, check=False)
    (tmp_path / "bad.yaml").write_text("gateway: {http_port: x}\n")
    bad_config = cli("config", "show", "--config", "bad.yaml", cwd=tmp_path, check=False)

    for r, words in ((bad_scope, "scopes must be"), (unknown, "no active key"), (bad_config, "gateway.http_port")):
        assert r.returncode == 2
        assert words in r.stderr.replace("\n", " ")
        assert "Traceback" not in r.stderr
