"""Shared helpers of the deployment tests: the repo paths and the `servoloop` command tree (walked in-process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="session")
def cli_root() -> Any:
    from servoloop.cli import app

    return typer.main.get_command(app)


def resolve_servoloop(root: Any, argv: list[str]) -> tuple[Any, list[str]]:
    """The command an argv (after `servoloop`) names, and the option flags it passes; AssertionError if none.

    Walks groups the way click does (typer ships its own click, so groups are told by their `commands`), then checks every `--flag` the argv gives is one the command accepts,
    so a renamed command or option fails here before it fails in a container.
    """
    cmd = root
    rest = list(argv)
    while getattr(cmd, "commands", None) is not None:
        assert rest, f"`servoloop {' '.join(argv)}` stops at a command group"
        sub = cmd.commands.get(rest[0])
        assert sub is not None, f"`servoloop {' '.join(argv)}`: no command {rest[0]!r} (have {sorted(cmd.commands)})"
        cmd, rest = sub, rest[1:]
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    flags = [a.split("=", 1)[0] for a in rest if a.startswith("-")]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"`servoloop {' '.join(argv)}`: unknown options {unknown} (has {sorted(known)})"
    return cmd, flags


def unknown_setting_keys(model: Any, data: Any, where: str = "") -> list[str]:
    """Keys of `data` that name no field of the pydantic `model` tree, at any depth.

    Nested sections of the settings tree ignore unknown keys, so a misspelt nested setting would load silently;
    this walks the YAML beside the fields (dicts of models and lists of models included).
    """
    from typing import get_args, get_origin

    from pydantic import BaseModel

    def model_of(tp: Any) -> Any:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp
        for arg in get_args(tp):
            if (m := model_of(arg)) is not None:
                return m
        return None

    if not isinstance(data, dict):
        return []
    bad: list[str] = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            bad.append(f"{where}{key}")
            continue
        sub = model_of(field.annotation)
        if sub is None:
            continue
        origin = get_origin(field.annotation)
        if origin is list and isinstance(value, list):
            for i, item in enumerate(value):
                bad += unknown_setting_keys(sub, item, f"{where}{key}[{i}].")
        elif origin is dict and isinstance(value, dict):
            for k, item in value.items():
                bad += unknown_setting_keys(sub, item, f"{where}{key}.{k}.")
        else:
            bad += unknown_setting_keys(sub, value, f"{where}{key}.")
    return bad
