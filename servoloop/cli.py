"""The `servoloop` command line."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from schemas.errors import ServoloopError

app = typer.Typer(help="servoloop: LLM serving with guardrails, telemetry, monitors and a retraining loop.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
keys_app = typer.Typer(help="Create, list and revoke API keys (stored as salted hashes).", no_args_is_help=True)
model_app = typer.Typer(help="Model artifacts: build the bundled tiny model.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the settings tree.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]


def _settings(config: Path | None):
    from servoloop.settings import load_settings

    return load_settings(config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _ensure_model(settings) -> None:
    """Build the bundled tiny model when a configured local model directory is the default one and missing."""
    from servoloop.settings import DEFAULT_TINY_MODEL_DIR

    for m in settings.gateway.models:
        if m.path and not (Path(m.path) / "config.json").exists():
            if Path(m.path).name == DEFAULT_TINY_MODEL_DIR.name:
                from retrain.tiny import build_tiny_model

                console.print(f"[bold]building the bundled tiny model into {m.path}[/bold]")
                build_tiny_model(Path(m.path))
            else:
                raise ServoloopError(f"model {m.name!r}: no model directory at {m.path}")


@app.command()
def up(config: ConfigOpt = None,
       no_broker: Annotated[bool, typer.Option("--no-broker", help="write events through the spool straight to the store")] = False) -> None:
    """Run the whole system on embedded defaults: gateway (gRPC :50051, HTTP :8000) and its companions."""
    from servoloop.up import run, serve_all

    settings = _settings(config).with_default_model()
    if no_broker:
        events = settings.events.model_copy(update={"broker": settings.events.broker.model_copy(update={"mode": "none"})})
        settings = settings.model_copy(update={"events": events})
    _setup_logging(settings.log_level)
    _ensure_model(settings)

    def ready(server) -> None:
        console.print(f"[green]servoloop is up[/green]: HTTP http://{server.host}:{server.http_port}/v1  "
                      f"gRPC {server.host}:{server.grpc_port}  dashboard http://{server.host}:{server.http_port}/admin/\n"
                      "create a key: [bold]servoloop keys create --tenant demo[/bold] "
                      "(for the dashboard: [bold]servoloop keys create --tenant ops --scope admin[/bold])")

    run(serve_all(settings, on_ready=ready))


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run one gateway (HTTP + gRPC) alone, for multi-replica deployments."""
    from servoloop.up import run, serve_gateway

    settings = _settings(config).with_default_model()
    _setup_logging(settings.log_level)
    run(serve_gateway(settings))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant the key belongs to")],
    scope: Annotated[list[str], typer.Option(help="infer, feedback, admin (repeatable)")] = ["infer", "feedback"],  # noqa: B006
    name: Annotated[str, typer.Option(help="a label for humans")] = "",
    rpm: Annotated[int | None, typer.Option(help="requests per minute (default from settings; 0 = unlimited)")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute (default from settings; 0 = unlimited)")] = None,
    max_streams: Annotated[int | None, typer.Option(help="concurrent streams")] = None,
    cache: Annotated[bool, typer.Option(help="serve temperature-0 repeats from the response cache")] = False,
    config: ConfigOpt = None,
) -> None:
    """Create a key. The key is printed once; only its salted hash is stored."""
    from gateway.auth import KeyStore

    settings = _settings(config)
    key_id, key = KeyStore(settings.keys_path).create(tenant, scope, name=name, rpm=rpm, tpm=tpm,
                                                      max_streams=max_streams, cache=cache)
    console.print(f"key id {key_id} for tenant {tenant!r}, scopes {sorted(set(scope))}; store it now, it is not shown again:")
    print(key)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (ids, tenants, scopes, limits; never secrets)."""
    from gateway.auth import KeyStore

    rows = [r.public() for r in KeyStore(_settings(config).keys_path).records()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("key id", "name", "tenant", "scopes", "rpm", "tpm", "streams", "revoked")
    for r in rows:
        table.add_row(str(r["key_id"]), str(r["name"]), str(r["tenant"]), ",".join(r["scopes"]),  # type: ignore[arg-type]
                      str(r["rpm"] if r["rpm"] is not None else "default"),
                      str(r["tpm"] if r["tpm"] is not None else "default"),
                      str(r["max_streams"] if r["max_streams"] is not None else "default"), str(r["revoked"]))
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke a key; running gateways refuse it within a second."""
    from gateway.auth import KeyStore

    KeyStore(_settings(config).keys_path).revoke(key_id)
    console.print(f"revoked {key_id}")


@model_app.command("build-tiny")
def model_build_tiny(
    out: Annotated[Path, typer.Option(help="output directory")] = Path(".servoloop/models/tiny-chat"),
    seed: Annotated[int, typer.Option(help="the build is deterministic from this seed")] = 0,
    steps: Annotated[int | None, typer.Option(help="training steps (default: the recipe's)")] = None,
) -> None:
    """Build the bundled tiny chat model (tokenizer + small Llama, trained briefly on CPU; no downloads)."""
    from retrain.tiny import build_tiny_model

    path = build_tiny_model(out, seed=seed, steps=steps)
    console.print(f"[green]tiny model ready[/green] at {path}")


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective settings as YAML, secrets redacted."""
    import yaml

    from servoloop.settings import redacted

    print(yaml.safe_dump(redacted(_settings(config).with_default_model()), sort_keys=False))


def _mount_optional() -> None:
    """Command groups that live in servoloop/commands/<name>.py (each a typer app named `app`)."""
    for name in ("guard", "db", "ingest", "events", "models", "monitor", "train", "retrain", "grade", "demo", "budgets"):
        try:
            module = importlib.import_module(f"servoloop.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"servoloop.commands.{name}":
                continue
            raise
        if hasattr(module, "app"):
            app.add_typer(module.app, name=name)
        for extra_name, extra in getattr(module, "TOP_LEVEL", {}).items():
            app.command(extra_name)(extra)


_mount_optional()


def main() -> None:
    try:
        app()
    except ServoloopError as e:
        console.print(f"[red]error[/red] ({e.code}): {e.message}")
        sys.exit(2)


if __name__ == "__main__":  # `python -m servoloop.cli …`, as `accelerate launch -m servoloop.cli train …` runs it
    main()
