"""`servoloop monitor …`: one monitor cycle (for cron or a Kubernetes CronJob), and the policy check.

With the embedded store (chDB) only one process may open the data directory: while `servoloop up` runs
(its scheduler runs the cycles there), `monitor run` gets a clear "store unavailable" error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="Quality and drift monitors: run a cycle, check a policy.", no_args_is_help=True)
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]


@app.command()
def run(
    config: ConfigOpt = None,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: monitors.policy_path, else the bundled one)")] = None,
    now_ms: Annotated[int | None, typer.Option("--now-ms", help="evaluate as of this epoch-ms time (default: now)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print every result and trigger as JSON lines")] = False,
) -> None:
    """Run one monitor cycle: evaluate the policy, record results, emit retrain triggers, send alerts.

    Results and triggers go to Kafka when events.broker.mode is external, else straight into the store.

    The alert state (hysteresis, cooldown) is read back from the store: cron runs never fire twice.

    Exit status 0 also when monitors alert; 2 on a configuration or store error.
    """
    from feedback.monitors.policy import load_policy
    from servoloop.settings import load_settings

    settings = load_settings(config)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy_file = load_policy(policy or settings.monitors.policy_path)
    report = asyncio.run(_run(settings, policy_file, now_ms))
    if as_json:
        import msgspec

        for event in [*report.results, *report.triggers]:
            print(msgspec.json.encode(event).decode())
    summary = report.summary()
    console.print(f"monitor cycle: {len(report.results)} results {summary['statuses']}, "
                  f"{len(report.triggers)} retrain triggers, {len(report.alerts)} alerts "
                  f"({report.alerts_delivered} delivered) in {report.elapsed_s:.2f} s")
    for trigger in report.triggers:
        console.print(f"[bold]retrain[/bold] {trigger.model}@{trigger.model_version} ({trigger.method}): {trigger.reason}")
    for name, error in report.errors.items():
        console.print(f"[red]monitor {name} failed[/red]: {error}")
    if not as_json:
        print(json.dumps(summary))


async def _run(settings: Any, policy: Any, now: int | None) -> Any:
    from feedback.monitors.alerts import WebhookNotifier
    from feedback.monitors.quality import Price
    from feedback.monitors.runner import default_monitors, run_cycle, sink_publisher, store_publisher
    from feedback.store import migrate, open_store
    from schemas.events import now_ms

    store = await open_store(settings.events.store, data_dir=settings.data_dir)
    sink = None
    notifier = WebhookNotifier(settings.monitors.webhook) if settings.monitors.webhook.url else None
    try:
        await migrate(store)
        if settings.events.broker.mode == "external":
            from feedback.sink import build_event_sink

            sink = build_event_sink(settings.events, spool_dir=settings.data_dir / "monitor-spool")
            await sink.start()
        publish = sink_publisher(sink) if sink is not None else store_publisher(store)
        prices = {m: Price(p.input_per_1k, p.output_per_1k) for m, p in settings.monitors.prices.items()}
        monitors = default_monitors(settings.monitors.report_dir or settings.data_dir / "monitor-reports")
        return await run_cycle(store, policy, now_ms=now if now is not None else now_ms(), publish=publish,
                               notifier=notifier, prices=prices, interval_ms=int(settings.monitors.interval_s * 1000),
                               monitors=monitors)
    finally:
        if sink is not None:
            await sink.aclose()
        if notifier is not None:
            await notifier.aclose()
        await store.aclose()


@app.command("check")
def check(policy: Annotated[Path | None, typer.Argument(help="policy file (default: the bundled one)")] = None) -> None:
    """Validate a policy file and list its monitors (errors name the file and the field)."""
    from feedback.monitors.policy import load_policy

    for m in load_policy(policy).monitors:
        action = m.action.type + (f" ({m.action.recipe})" if m.action.type == "retrain" else "")
        print(f"{m.name:24s} {m.kind:8s} {m.metric:20s} {m.compare:9s} threshold={m.threshold:g} "
              f"clear={m.clear:g} min_samples={m.min_samples} -> {action}{'' if m.enabled else ' [disabled]'}")
