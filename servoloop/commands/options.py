"""CLI options shared by the registry commands (`servoloop models ...` and its release commands).

Module-level aliases: typer resolves a command's annotations by name in the module that defines it, so each
command module imports the names it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

UrlOpt = Annotated[str, typer.Option("--url", envvar="SERVOLOOP_URL",
                                     help="the admin API of the running `servoloop up` (HTTP base URL)")]
KeyOpt = Annotated[str, typer.Option("--key", envvar="SERVOLOOP_ADMIN_KEY", help="an API key with the admin scope")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]
DirectOpt = Annotated[bool, typer.Option("--direct", help="use the ClickHouse server of the settings directly "
                                                          "(events.store.kind: clickhouse), not the admin API")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
