"""Shared fixtures for the grader tests: one all-MiniLM-L6-v2 per session, a fresh chDB database per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from feedback.monitors.embeddings import PromptEmbedder
from feedback.store import ChdbStore, Store, migrate


@pytest.fixture(scope="session")
def embedder() -> PromptEmbedder:
    """The real embedding model, loaded once per test session (it takes seconds)."""
    e = PromptEmbedder()
    e.load()
    return e


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    from tests.support.clickhouse_http import shared_chdb_session

    database = f"t_{uuid.uuid4().hex[:12]}"
    s = ChdbStore(shared_chdb_session(), database)
    await migrate(s)
    yield s
    await s.query(f"DROP DATABASE IF EXISTS {database}")
    await s.aclose()
