"""Fixtures of the retraining tests: a migrated store of each test's own, a tiny real LoRA adapter per session."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from feedback.store import ChdbStore, Store, migrate
from tests.support.clickhouse_http import shared_chdb_session


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    """A migrated, empty database of its own on the process's chDB session (dropped afterwards)."""
    s = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(s)
    yield s
    await s.query(f"DROP DATABASE IF EXISTS {s.database}")


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
