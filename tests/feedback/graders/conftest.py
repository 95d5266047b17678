"""Shared fixtures for the grader tests: one all-MiniLM-L6-v2 per session, a fresh chDB database per test."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from feedback.monitors.embeddings import PromptEmbedder


class MemoEmbedder(PromptEmbedder):
    """The real model, remembering texts it has seen: tests reuse answer texts under new event ids."""

    def __init__(self) -> None:
        super().__init__()
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        new = sorted({t for t in texts if t not in self.memo})
        if new:
            self.memo.update(zip(new, super().embed(new), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else super().embed(texts)


@pytest.fixture(scope="session")
def embedder() -> PromptEmbedder:
    """The real embedding model, loaded once per test session (it takes seconds)."""
    e = MemoEmbedder()
    e.load()
    return e

