"""`servoloop demo`: start everything on embedded defaults, play simulated users, let the loop close, report."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def demo(
    quick: Annotated[bool, typer.Option("--quick", help="fewer users and turns, a shorter training (CI: ~3-4 min)")] = False,
    users: Annotated[int | None, typer.Option("--users", min=2, max=1000,
                                              help="trainer users (held-out and poisoning groups scale along)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the users, their questions and their sampling")] = 7,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="state of the demo system "
                                                  "(default: a fresh temporary directory)")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="write the final report here as JSON")] = None,
    keep_running: Annotated[bool, typer.Option("--keep-running", help="keep the system (and its dashboard) up "
                                               "after the report, until Ctrl-C")] = False,
    no_broker: Annotated[bool, typer.Option("--no-broker", help="events through the spool straight to the store "
                                            "instead of the local Kafka-protocol broker")] = False,
    http_port: Annotated[int, typer.Option(help="HTTP port of the gateway and dashboard (0: any free port)")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port of the gateway (0: any free port)")] = 50051,
    timeout: Annotated[float | None, typer.Option(help="stop and report after this many seconds")] = None,
    screenshot: Annotated[Path | None, typer.Option("--screenshot", help="save a PNG of the dashboard here at the "
                                                    "end (Playwright + the system chromium)")] = None,
) -> None:
    """The closed loop in one command: users with a hidden preference, drift, retraining, canary, poisoning.

    Starts the whole system (as `servoloop up`) with a demo monitor policy, plays simulated users over HTTP
    and gRPC, and waits while the loop runs by itself: monitor -> trigger -> DPO LoRA -> gate -> canary ->
    promotion -> hot swap, then a poisoned phase the gate must reject. Ends with a report from ClickHouse
    data (held-out satisfaction before and after, the timeline, the promoted version's lineage).
    Exit status 1 when the loop did not close.
    """
    from dataclasses import replace

    from servoloop.cli import _ensure_model
    from servoloop.demo import DemoPlan, demo_settings, run_demo
    from servoloop.settings import DEFAULT_TINY_MODEL_DIR
    from servoloop.up import run

    plan = (DemoPlan.quick() if quick else DemoPlan.full()).scaled(users)
    if timeout is not None:
        plan = replace(plan, timeout_s=timeout)
    root = data_dir or Path(tempfile.mkdtemp(prefix="servoloop-demo-"))
    settings = demo_settings(plan, root, model_dir=DEFAULT_TINY_MODEL_DIR.resolve(), http_port=http_port,
                             grpc_port=grpc_port, broker=not no_broker)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _ensure_model(settings)
    console.print(f"[bold]servoloop demo[/bold] ({plan.name}): {plan.trainers} trainers, {plan.holdout} held-out "
                  f"users, {plan.poisoners} poisoners; data in {root}")
    result: dict = {}

    async def main() -> None:
        result.update(await run_demo(plan, settings, seed=seed, report_path=report, keep_running=keep_running,
                                     screenshot=screenshot, console=console))

    run(main())
    if not result.get("ok"):
        raise typer.Exit(1)


TOP_LEVEL = {"demo": demo}
