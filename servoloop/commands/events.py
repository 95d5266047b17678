"""`servoloop events tail`: watch the event topics of a broker, one line (or JSON object) per record.

Wiring only: the reading and formatting live in `feedback.tail`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The event topics: watch what the gateways and the loop publish.", no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]


@app.command()
def tail(
    types: Annotated[list[str] | None, typer.Option(
        "--type", "-t", help="only this event type (repeatable): inference, guardrail, feedback, model, monitor, "
                             "retrain, dead_letter")] = None,
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="start at each topic's first record")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="exit after N records")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per record, with the full event")] = False,
    bootstrap: Annotated[str | None, typer.Option(
        "--bootstrap", "-b", help="host:port of the broker (default: events.broker.bootstrap_servers)")] = None,
    prefix: Annotated[str | None, typer.Option(help="topic prefix (default: events.broker.topic_prefix)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Follow the event topics (all, or those of --type), printing each event as it arrives.

    A record that is no valid event prints as UNDECODABLE with its reason. Ctrl-C stops.
    """
    import logging

    from feedback.tail import describe, follow, to_json
    from schemas.errors import ConfigError
    from schemas.events import EVENT_BY_TAG
    from schemas.topics import all_topics, topic_name, validate_prefix
    from servoloop.settings import load_settings

    settings = load_settings(config)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    broker = settings.events.broker
    servers = bootstrap or (broker.bootstrap_servers if broker.mode == "external" else "")
    if not servers and broker.mode == "embedded":
        from feedback.pipeline import embedded_broker_address

        servers = embedded_broker_address(settings.data_dir) or ""
    if not servers:
        raise ConfigError(f"no broker address: events.broker.mode is {broker.mode!r} and no `servoloop up` runs on "
                          f"{settings.data_dir}; pass --bootstrap HOST:PORT")
    prefix = validate_prefix(broker.topic_prefix if prefix is None else prefix)
    wanted: set[str] | None = None
    if types:
        unknown = sorted(set(types) - EVENT_BY_TAG.keys())
        if unknown:
            raise typer.BadParameter(f"unknown type {', '.join(unknown)}; one of {', '.join(EVENT_BY_TAG)}",
                                     param_hint="--type")
        wanted = set(types)
        topics = sorted({topic_name(EVENT_BY_TAG[t].topic, prefix) for t in wanted})
    else:
        topics = list(all_topics(prefix))

    shown = 0
    records = follow(servers, topics, from_beginning=from_beginning)
    try:
        for record in records:
            if wanted is not None and record.event is not None and record.type not in wanted:
                continue
            print(to_json(record) if as_json else describe(record), flush=True)
            shown += 1
            if limit is not None and shown >= limit:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # piped into `head` and the like: the reader left; exit quietly (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        records.close()
