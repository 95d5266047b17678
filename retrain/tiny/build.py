"""Building the bundled tiny chat model: corpus → tokenizer → Llama trained on CPU → a Hugging Face directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

from retrain.tiny.conversations import CORPUS_DIR, generate_corpus, load_ingredients
from retrain.tiny.tokenizer import BOS_EOT, hf_tokenizer, train_tokenizer
from retrain.tiny.training import TrainingPlan, encode_examples, model_config, train
from schemas.errors import ErrorKind, ServoloopError

DEFAULT_TINY_MODEL_DIR = Path(".servoloop/models/tiny-chat")  # relative to the repository root
VOCAB_SIZE = 4096  # an upper bound: BPE stops merging earlier when the corpus has fewer useful merges
MAX_MODEL_LEN = 2048
MANIFEST = "tiny_build.json"


class TinyModelBuildError(ServoloopError):
    """The tiny model could not be built (bad arguments, or the output directory cannot be written)."""

    kind = ErrorKind.FAILED_PRECONDITION
    code = "tiny_model_build_failed"


def corpus_digest(root: Path = CORPUS_DIR) -> str:
    """SHA-256 over the corpus ingredient files (names and bytes), for the build's lineage."""
    h = hashlib.sha256()
    for path in sorted(root.glob("*.json")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build_tiny_model(out_dir: Path, *, seed: int = 0, steps: int | None = None, progress: bool = True) -> Path:
    """Train the tiny chat model from the bundled corpus into `out_dir` (replaced if present); returns it.

    Same seed and steps on the same torch build → identical tokenizer.json and model.safetensors.
    Downloads nothing. Raises TinyModelBuildError for negative steps or an unwritable `out_dir`,
    CorpusError when the corpus ingredients are inconsistent.
    """
    if steps is not None and steps < 0:
        raise TinyModelBuildError(f"steps must be >= 0, got {steps}", param="steps")
    plan = TrainingPlan() if steps is None else replace(TrainingPlan(), steps=steps)
    out_dir = Path(out_dir)
    started = time.monotonic()
    with _reporter(progress, plan.steps) as report:
        corpus = generate_corpus(seed, ingredients=load_ingredients())
        tok = train_tokenizer(corpus.texts(), VOCAB_SIZE)
        config = model_config(tok, max_position_embeddings=MAX_MODEL_LEN)
        examples = encode_examples(corpus, tok, plan.max_len)
        losses: list[float] = []

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            report(step + 1, loss)

        model = train(config, examples, plan, seed, on_step)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = [config.eos_token_id, tok.token_to_id(BOS_EOT)]
    model.generation_config.pad_token_id = config.pad_token_id
    manifest = {
        "name": "servoloop-tiny-chat", "seed": seed, "plan": asdict(plan), "corpus_sha256": corpus_digest(),
        "chats": len(corpus.chats), "prose_documents": len(corpus.prose), "examples": len(examples),
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size,
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
    }
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model.save_pretrained(staging, safe_serialization=True)
        hf_tokenizer(tok, model_max_length=MAX_MODEL_LEN).save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(staging, out_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise TinyModelBuildError(f"cannot write the tiny model to {out_dir}: {e}", param="out_dir") from e
    if progress:
        _console_print(f"tiny model built in {time.monotonic() - started:.1f}s → {out_dir} "
                       f"({manifest['parameters'] / 1e6:.1f}M parameters, final loss {manifest['final_loss']})")
    return out_dir


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` with `staging` so readers see the old model or the new one, never a half-written one."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _reporter(enabled: bool, total: int) -> Iterator[Callable[[int, float], None]]:
    """A step callback that drives a rich progress bar, or does nothing when progress is off."""
    if not enabled:
        yield lambda step, loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]training tiny model"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn()) as bar:
        task = bar.add_task("train", total=total, loss="-")
        yield lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.3f}")


def _console_print(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message)
