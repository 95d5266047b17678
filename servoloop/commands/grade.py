"""`servoloop grade …`: the online graders: run the grading worker, train the toxicity head, evaluate the graders.

With the embedded store (chDB) only one process may open the data directory: `grade run` needs the
store to itself (or a ClickHouse server); grades go to Kafka when events.broker.mode is external, else
straight into the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="Online graders: grade sampled traffic, train the toxicity head, evaluate graders.",
                  no_args_is_help=True)
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $SERVOLOOP_CONFIG)")]


@app.command()
def run(
    config: ConfigOpt = None,
    once: Annotated[bool, typer.Option("--once", help="one grading cycle, then exit (cron)")] = False,
) -> None:
    """Grade sampled recent inferences with every enabled grader (settings `grading:`), cycle after cycle.

    Prints each cycle's summary as one JSON line. Exit status 2 on a configuration or store error.
    """
    from servoloop.settings import load_settings

    settings = load_settings(config)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_run(settings, once))
    except KeyboardInterrupt:
        pass


async def _run(settings: Any, once: bool) -> None:
    from feedback.graders.worker import GradingWorker
    from feedback.monitors.runner import sink_publisher, store_publisher
    from feedback.store import migrate, open_store

    store = await open_store(settings.events.store, data_dir=settings.data_dir)
    sink = None
    try:
        await migrate(store)
        if settings.events.broker.mode == "external":
            from feedback.sink import build_event_sink

            sink = build_event_sink(settings.events, spool_dir=settings.data_dir / "grade-spool")
            await sink.start()
        worker = GradingWorker(store, sink_publisher(sink) if sink is not None else store_publisher(store),
                               settings.grading)
        while True:
            report = await worker.run_once()
            print(json.dumps(report.summary()), flush=True)
            if once:
                return
            await asyncio.sleep(settings.grading.interval_s)
    finally:
        if sink is not None:
            await sink.aclose()
        await store.aclose()


@app.command("train-toxicity")
def train_toxicity(
    seed: Annotated[int, typer.Option(help="the labelled set's seed (the bundled set's by default)")] = 11,
    l2: Annotated[float, typer.Option(help="L2 penalty of the logistic head")] = 1e-3,
    out: Annotated[Path | None, typer.Option(help="where to write the head (default: the bundled .npz)")] = None,
) -> None:
    """Fit the toxicity head on the labelled set's train split and record its held-out precision/recall."""
    from feedback.graders.toxicity import HEAD_PATH, train_head
    from feedback.monitors.embeddings import PromptEmbedder

    report = train_head(PromptEmbedder(), seed=seed, l2=l2)
    path = report.head.save(out or HEAD_PATH)
    console.print(f"[green]toxicity head {report.head.version}[/green] -> {path}: held-out precision "
                  f"{report.heldout['precision']:.3f}, recall {report.heldout['recall']:.3f} "
                  f"(n={report.heldout['n']}; word-list baseline precision {report.wordlist_heldout['precision']:.3f})")
    print(json.dumps(report.head.metrics, sort_keys=True))


@app.command("eval")
def evaluate() -> None:
    """Measure every grader on its bundled labelled set (precision, recall, accuracy, throughput) as JSON."""
    from feedback.graders.evaluation import evaluate_all
    from feedback.monitors.embeddings import PromptEmbedder

    embedder = PromptEmbedder()
    embedder.load()
    print(json.dumps(evaluate_all(embedder), indent=2, sort_keys=True))
