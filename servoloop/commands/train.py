"""`servoloop train …`: one training job (DPO or SFT with LoRA) on a dataset snapshot, in this process.

The retrain worker runs it as a subprocess; on a cluster it runs under `accelerate launch -m servoloop.cli
train …` (deploy/k8s/train-job.yaml). Exit status: 0 done, 2 bad input, 3 timeout (a checkpoint was saved:
run again with --resume).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def train(
    dataset: Annotated[Path, typer.Option(help="dataset snapshot directory (retrain.datasets)")],
    base: Annotated[Path, typer.Option(help="base model directory (Hugging Face format)")],
    out: Annotated[Path, typer.Option(help="output directory: adapter/, checkpoints/, train_log.jsonl")],
    recipe: Annotated[str, typer.Option(help="bundled recipe name (dpo, sft) or a recipe YAML file")] = "dpo",
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in --out")] = False,
    epochs: Annotated[float | None, typer.Option(help="override the recipe's epochs")] = None,
    save_steps: Annotated[int | None, typer.Option(help="override the recipe's checkpoint interval")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="override the recipe's timeout")] = None,
    progress: Annotated[bool, typer.Option(help="progress bars on stderr")] = True,
) -> None:
    """Train a LoRA adapter with TRL (DPO or SFT) and write a PEFT adapter directory under OUT/adapter."""
    from retrain.recipes import load_recipe
    from retrain.train import EXIT_TIMEOUT, TrainingTimeout
    from retrain.train import train as run_training

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in (("epochs", epochs), ("save_steps", save_steps), ("timeout_s", timeout_s))
                 if v is not None}
    r = load_recipe(recipe, **overrides)
    try:
        result = run_training(r, dataset, base, out, resume=resume, progress=progress)
    except TrainingTimeout as e:
        console.print(f"[yellow]timeout[/yellow]: {e.message}")
        sys.exit(EXIT_TIMEOUT)
    console.print(f"[green]adapter ready[/green] at {result.adapter_dir} "
                  f"({result.summary['global_step']} steps, {result.summary['wall_s']} s)")
    print(json.dumps({"adapter_dir": str(result.adapter_dir), **result.summary}, default=str))


TOP_LEVEL = {"train": train}
