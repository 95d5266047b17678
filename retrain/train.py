"""The training job: TRL DPO or SFT with a PEFT LoRA adapter, on a dataset snapshot, into a PEFT adapter directory.

Runs as its own process (`servoloop train --recipe dpo --dataset SNAPSHOT --base MODEL --out DIR [--resume]`),
so a crash or an out-of-memory never takes a server down. Layout of `DIR`:

    DIR/adapter/              a standard PEFT adapter (adapter_config.json, adapter_model.safetensors)
    DIR/adapter/training_summary.json
    DIR/checkpoints/checkpoint-N/   every `recipe.save_steps` steps (the last two kept); `--resume` picks the latest
    DIR/train_log.jsonl       one JSON object per logging step: step, epoch, loss, learning rate, reward stats

On CPU the configs get `use_cpu=True, bf16=False, gradient_checkpointing=False` (same loss, 4-5x faster here).
With PEFT and `ref_model=None` the DPO reference is the base model (the adapter disabled).
A run past `recipe.timeout_s` saves a checkpoint, stops and raises TrainingTimeout (resume it later).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.datasets import DatasetSnapshot
from retrain.recipes import Recipe
from schemas.errors import DeadlineExceeded, FailedPrecondition

log = logging.getLogger(__name__)

ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
SUMMARY = "training_summary.json"
EXIT_TIMEOUT = 3  # the process exit status of a run that hit its timeout


class TrainingTimeout(DeadlineExceeded):
    """The run hit `recipe.timeout_s`; a checkpoint was saved, `--resume` continues from it."""

    code = "training_timeout"


class TrainingDataError(FailedPrecondition):
    """The snapshot has nothing to train on for the recipe's method."""

    code = "training_data_missing"


@dataclass(frozen=True, slots=True)
class TrainingResult:
    adapter_dir: Path
    summary: dict[str, Any]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under `out_dir/checkpoints` (one with its trainer state), or None."""
    root = Path(out_dir) / CHECKPOINTS
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def _messages(prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def dpo_records(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Snapshot pairs as TRL conversational preference records (the chat template is applied by TRL)."""
    return [{"prompt": _messages(p["prompt"]), "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def sft_records(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Snapshot SFT examples as conversational prompt/completion records (the loss covers the completion)."""
    return [{"prompt": _messages(e["prompt"]), "completion": [{"role": "assistant", "content": e["completion"]}]}
            for e in examples]


def _callbacks(out_dir: Path, deadline: float, state: dict[str, Any]) -> list[Any]:
    from transformers import TrainerCallback

    log_path = out_dir / LOG_FILE

    class JsonLog(TrainerCallback):
        """One JSON line per logging step (appended, so a resumed run continues the same file)."""

        def on_log(self, args: Any, st: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs:
                return
            row = {"ts_ms": time.time_ns() // 1_000_000, "step": st.global_step, "epoch": st.epoch,
                   **{k: v for k, v in logs.items() if isinstance(v, int | float)}}
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    class Deadline(TrainerCallback):
        """Past the deadline: save a checkpoint and stop (the caller raises TrainingTimeout)."""

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            if time.monotonic() > deadline:
                state["timed_out"] = True
                control.should_save = True
                control.should_training_stop = True

    return [JsonLog(), Deadline()]


def train(recipe: Recipe, dataset: Path, base_model: Path, out_dir: Path, *, resume: bool = False,
          progress: bool = True) -> TrainingResult:
    """Train a LoRA adapter for `base_model` on the snapshot at `dataset`; write it under `out_dir/adapter`.

    `resume`: continue from the latest checkpoint in `out_dir` (from scratch when there is none).
    Raises TrainingDataError (nothing to train on), TrainingTimeout (checkpoint saved), FailedPrecondition
    (not a snapshot).
    """
    started, t0 = time.time(), time.monotonic()
    deadline = t0 + recipe.timeout_s
    snapshot = DatasetSnapshot.load(dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while waiting (the default) slow a CPU job 5-10x when other processes share the
    # cores (measured here: 10-16 s vs 1-2 s per step); passive waiting costs nothing on an idle machine.
    # Effective only before torch loads: this process, or the env the worker gives it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if recipe.method == "dpo":
        records = dpo_records(snapshot.pairs("train"))
    else:
        records = sft_records(snapshot.sft("train"))
    if not records:
        raise TrainingDataError(f"snapshot {dataset} has no {recipe.method} training records")

    cpu = not torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32 if cpu else "auto")
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=list(recipe.lora.target_modules), task_type="CAUSAL_LM")
    common: dict[str, Any] = dict(
        output_dir=str(out_dir / CHECKPOINTS), per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps, learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.epochs, seed=recipe.seed, data_seed=recipe.seed, max_length=recipe.max_length,
        logging_steps=recipe.logging_steps, save_strategy="steps", save_steps=recipe.save_steps, save_total_limit=2,
        report_to=[], disable_tqdm=not progress, use_cpu=cpu, bf16=False if cpu else torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False, dataloader_num_workers=0, lr_scheduler_type="linear", warmup_steps=0,
    )
    state: dict[str, Any] = {"timed_out": False}
    callbacks = _callbacks(out_dir, deadline, state)
    if recipe.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        weights = list(recipe.loss_weights) if recipe.loss_weights else None
        args = DPOConfig(**common, beta=recipe.beta, loss_type=list(recipe.loss_type), loss_weights=weights)
        trainer = DPOTrainer(model=model, ref_model=None, args=args,
                             train_dataset=Dataset.from_list(records), processing_class=tok, peft_config=lora,
                             callbacks=callbacks)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, completion_only_loss=True),
                             train_dataset=Dataset.from_list(records), processing_class=tok, peft_config=lora,
                             callbacks=callbacks)

    checkpoint = latest_checkpoint(out_dir) if resume else None
    log.info("training %s on %d records from %s (resume from %s)", recipe.method, len(records), dataset, checkpoint)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if state["timed_out"]:
        raise TrainingTimeout(f"training passed its timeout of {recipe.timeout_s:g}s at step "
                              f"{trainer.state.global_step}; resume with --resume",
                              details={"step": trainer.state.global_step, "checkpoint": str(latest_checkpoint(out_dir))})

    adapter_dir = out_dir / ADAPTER
    trainer.save_model(str(adapter_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    summary = {
        "method": recipe.method, "recipe": recipe.name, "hyperparameters": recipe.hyperparameters(),
        "base_model": str(base_model), "dataset": {"path": str(dataset), "sha256": snapshot.sha256},
        "records": len(records), "global_step": trainer.state.global_step, "epochs": trainer.state.epoch,
        "train_loss": output.training_loss, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else output.training_loss,
        "final_reward_accuracy": last.get("rewards/accuracies"), "final_reward_margin": last.get("rewards/margins"),
        "resumed_from": checkpoint.name if checkpoint else None, "device": "cpu" if cpu else "cuda",
        "started_ms": int(started * 1000), "wall_s": round(time.monotonic() - t0, 2),
    }
    (adapter_dir / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    log.info("adapter written to %s in %.1fs (loss %s -> %s)", adapter_dir, summary["wall_s"],
             summary["first_loss"], summary["final_loss"])
    return TrainingResult(adapter_dir, summary)
