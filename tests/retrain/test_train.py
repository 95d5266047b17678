"""Training jobs on the bundled tiny model: DPO + LoRA learns a preference from the store and passes the gate,
a poisoned (reversed) dataset is rejected, and a killed job resumes from its last checkpoint.

The figures (wall time, accuracies) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from retrain.datasets import DatasetFilters, write_snapshot
from retrain.gate import evaluate
from retrain.pairs import FeedbackRow, InferenceRow, build_pairs
from retrain.recipes import load_recipe
from retrain.tiny.preferences import style_preference_events
from retrain.train import latest_checkpoint
from tests.conftest import REPO
from tests.retrain.conftest import DEMO_T0, TrainedRun, job_env, run_train_cli


def _gate(run: TrainedRun, base: Path, eval_pairs: list | None = None):
    recipe = load_recipe("dpo")
    return evaluate(base_dir=base, candidate_dir=run.adapter_dir,
                    eval_pairs=eval_pairs if eval_pairs is not None else run.snapshot.pairs("eval"),
                    thresholds=recipe.gate, beta=recipe.beta, max_length=recipe.max_length, seed=recipe.seed)


def test_dpo_lora_on_1k_learnable_pairs_passes_the_gate(learnable_run: TrainedRun, tiny_model_dir: Path) -> None:
    run = learnable_run
    assert run.summary["records"] >= 1000
    assert (run.adapter_dir / "adapter_config.json").is_file()
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    lines = [json.loads(x) for x in (run.out_dir / "train_log.jsonl").read_text().splitlines()]
    assert lines and all("loss" in x for x in lines if "train_runtime" not in x)

    result = _gate(run, tiny_model_dir)
    f = result.figures
    print(f"\nlearnable: train wall {run.wall_s:.1f} s; held-out preference accuracy {f['preference_accuracy']:.3f} "
          f"(base {f['current_preference_accuracy']:.3f}; log-prob accuracy {f['logp_accuracy']:.3f} vs base "
          f"{f['current_logp_accuracy']:.3f}); win-rate {f['win_rate']:.3f} (target style "
          f"{f['candidate_judge_score']:.2f} vs {f['current_judge_score']:.2f}); red-team findings "
          f"{f['safety_findings']} vs {f['current_safety_findings']}; perplexity x{f['perplexity_ratio']:.3f}; "
          f"gate {f['gate_wall_s']} s {f['gate_timings_s']}")
    assert result.passed, result.reasons
    assert f["preference_accuracy"] >= 0.9
    assert f["preference_accuracy"] - f["current_preference_accuracy"] >= 0.3
    assert f["logp_accuracy"] > f["current_logp_accuracy"]


def test_a_poisoned_dataset_is_rejected_by_the_gate(poisoned_run: TrainedRun, learnable_snapshot,
                                                    tiny_model_dir: Path) -> None:
    result = _gate(poisoned_run, tiny_model_dir)
    f = result.figures
    print(f"\npoisoned: train wall {poisoned_run.wall_s:.1f} s; held-out (reversed) preference accuracy "
          f"{f['preference_accuracy']:.3f}; win-rate {f['win_rate']:.3f} (target style "
          f"{f['candidate_judge_score']:.2f} vs {f['current_judge_score']:.2f}); reasons {list(result.reasons)}")
    assert not result.passed
    assert any("win-rate" in r for r in result.reasons), result.reasons
    # On the honest held-out pairs the poisoned adapter prefers the wrong answers.
    honest = _gate(poisoned_run, tiny_model_dir, learnable_snapshot.pairs("eval"))
    print(f"poisoned on the honest held-out pairs: accuracy {honest.figures['preference_accuracy']:.3f}")
    assert honest.figures["preference_accuracy"] < 0.5
    assert not honest.passed


def _small_snapshot(root: Path, pairs: int):
    inferences, feedback = style_preference_events(pairs, tenant="resume", start_ms=DEMO_T0, seed=3)
    rows = {i.event_id: InferenceRow(i.event_id, i.ts_ms, i.tenant, tuple((m.role, m.content) for m in i.messages),
                                     i.response) for i in inferences}
    fb = [FeedbackRow(f.event_id, f.ts_ms, f.tenant, f.target_id, f.kind, preferred_id=f.preferred_id,
                      other_id=f.other_id) for f in feedback]
    return write_snapshot(build_pairs(rows, fb), root, filters=DatasetFilters(start_ms=DEMO_T0, end_ms=DEMO_T0 + 10**8))


def test_a_training_job_killed_after_a_checkpoint_resumes_to_completion(tmp_path: Path, tiny_model_dir: Path) -> None:
    snapshot = _small_snapshot(tmp_path / "datasets", 100)  # 90 training pairs: 6 steps an epoch at batch 16
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "servoloop.cli", "train", "--dataset", str(snapshot.path), "--base",
           str(tiny_model_dir), "--out", str(out), "--recipe", "dpo", "--epochs", "2", "--save-steps", "2",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=job_env())
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no clean shutdown, no final save
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and not (out / "adapter").exists()
    step = int(killed_at.name.rsplit("-", 1)[1])
    assert 2 <= step < 12

    done = run_train_cli(snapshot.path, tiny_model_dir, out, "--recipe", "dpo", "--epochs", "2", "--save-steps", "2",
                         "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "adapter" / "training_summary.json").read_text())
    assert summary["resumed_from"] is not None
    assert int(summary["resumed_from"].rsplit("-", 1)[1]) >= step
    assert summary["global_step"] == 12
    logged = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(logged) == 12


def test_sft_on_corrections_writes_a_loadable_peft_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    inferences, feedback = style_preference_events(120, tenant="sft", start_ms=DEMO_T0, seed=4)
    rows = {i.event_id: InferenceRow(i.event_id, i.ts_ms, i.tenant, tuple((m.role, m.content) for m in i.messages),
                                     i.response) for i in inferences}
    # The user corrects the worse answer of each pair with the better one.
    fb = [FeedbackRow(f"c{n}", f.ts_ms, f.tenant, f.other_id, "correction", correction=rows[f.preferred_id].response)
          for n, f in enumerate(feedback)]
    snapshot = write_snapshot(build_pairs(rows, fb), tmp_path / "datasets",
                              filters=DatasetFilters(start_ms=DEMO_T0, end_ms=DEMO_T0 + 10**8))
    assert snapshot.manifest["counts"]["sft_by_source"]["correction"] >= 30
    done = run_train_cli(snapshot.path, tiny_model_dir, tmp_path / "job", "--recipe", "sft")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "job" / "adapter" / "training_summary.json").read_text())
    assert summary["method"] == "sft" and summary["global_step"] >= 2 and summary["train_loss"] > 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "job" / "adapter"))
    assert model.active_adapter == "default"


def test_a_job_past_its_timeout_checkpoints_and_exits_3(tmp_path: Path, tiny_model_dir: Path) -> None:
    snapshot = _small_snapshot(tmp_path / "datasets", 100)
    out = tmp_path / "job"
    done = run_train_cli(snapshot.path, tiny_model_dir, out, "--recipe", "dpo", "--timeout-s", "0.01")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "timeout" in done.stderr
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "checkpoint-1"  # saved on the way out
    assert not (out / "adapter").exists()
