"""Fixtures of the retraining tests: a migrated store of each test's own, a tiny real LoRA adapter per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from feedback.store import ChdbStore, migrate, write_events
from tests.conftest import REPO
from tests.support.clickhouse_http import shared_chdb_session

# The gate runs torch in this process: passive OpenMP waits keep it fast on shared cores (see retrain/train.py).
# Effective when torch is not loaded yet (running tests/retrain on its own).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA adapter (r=4 on q_proj/v_proj, non-zero weights) for the bundled tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-lora")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(out)
    return out


# --- training: preference datasets from the store, one DPO run per dataset per session ---------------------

TRAIN_PAIRS = 1130  # after dedup and the 10% time-split hold-out, >= 1,000 training pairs
DEMO_T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class TrainedRun:
    """A `servoloop train` subprocess run: its snapshot, output dir, adapter and wall time."""

    snapshot: Any
    out_dir: Path
    adapter_dir: Path
    wall_s: float
    summary: dict[str, Any]


def job_env() -> dict[str, str]:
    from retrain.worker import job_env as env

    return env()


def run_train_cli(dataset: Path, base: Path, out: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m servoloop.cli train …` as its own process, as the worker runs it."""
    cmd = [sys.executable, "-m", "servoloop.cli", "train", "--dataset", str(dataset), "--base", str(base),
           "--out", str(out), "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=job_env())


async def _seeded_snapshot(tenant: str, reverse: bool, root: Path) -> Any:
    from retrain.datasets import DatasetFilters, build_snapshot
    from retrain.tiny.preferences import style_preference_events

    s = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(s)
    inferences, feedback = style_preference_events(TRAIN_PAIRS, reverse=reverse, tenant=tenant, start_ms=DEMO_T0)
    await write_events(s, [*inferences, *feedback])
    snapshot = await build_snapshot(s, DatasetFilters(start_ms=DEMO_T0, end_ms=DEMO_T0 + 86_400_000, tenant=tenant,
                                                      model="tiny-chat"), root)
    await s.query(f"DROP DATABASE IF EXISTS {s.database}")
    return snapshot


def _train_once(snapshot: Any, base: Path, out: Path) -> TrainedRun:
    t0 = time.monotonic()
    done = run_train_cli(snapshot.path, base, out, "--recipe", "dpo")
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "adapter" / "training_summary.json").read_text())
    print(f"\nDPO on {summary['records']} pairs: {wall:.1f} s wall (training {summary['wall_s']} s, "
          f"{summary['global_step']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f})")
    return TrainedRun(snapshot, out, out / "adapter", wall, summary)


@pytest.fixture(scope="session")
async def learnable_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """>= 1,000 training pairs from the store: concise-polite answers preferred over every other style."""
    return await _seeded_snapshot("learn", False, tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
async def poisoned_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same feedback with every preference reversed."""
    return await _seeded_snapshot("poison", True, tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def learnable_run(learnable_snapshot: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """DPO + LoRA on the learnable snapshot, trained once per session (a `servoloop train` subprocess)."""
    return _train_once(learnable_snapshot, tiny_model_dir, tmp_path_factory.mktemp("dpo-learn"))


@pytest.fixture(scope="session")
def poisoned_run(poisoned_snapshot: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return _train_once(poisoned_snapshot, tiny_model_dir, tmp_path_factory.mktemp("dpo-poison"))
