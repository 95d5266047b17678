"""Dataset snapshots from the store: the SQL at the edge, pair building in `retrain.pairs`, Parquet out.

    filters = DatasetFilters(start_ms=..., end_ms=..., tenant="acme", model="tiny-chat")
    snapshot = await build_snapshot(store, filters, out_root=Path(".servoloop/datasets"))
    snapshot.path / "train.parquet", snapshot.manifest["sha256"]

A snapshot is a directory named by its content hash: `train.parquet`, `eval.parquet` (preference pairs),
`sft_train.parquet`, `sft_eval.parquet` (SFT examples) and `manifest.json` (content sha256, source window,
filters, counts per source, the SQL it came from, the source feedback event ids). The same rows always
give the same hash and the same files: a training job reads the snapshot, never the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feedback.store.base import ParamValue, Store
from retrain.pairs import (
    SOURCES,
    BuiltDataset,
    FeedbackRow,
    InferenceRow,
    PairRules,
    PreferencePair,
    SftExample,
    build_pairs,
    group_prompts,
    time_split,
)
from schemas.errors import FailedPrecondition, InvalidRequest

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class UnredactedText(FailedPrecondition):
    """A dataset text still holds something the guardrails would redact: it cannot have come from the store."""

    code = "dataset_unredacted_text"


class EmptyDataset(FailedPrecondition):
    """The filters matched no feedback that makes a pair or an example."""

    code = "dataset_empty"


@dataclass(frozen=True, slots=True)
class DatasetFilters:
    """Which feedback a snapshot reads: window `[start_ms, end_ms)`, tenant, model, version; and the pair rules."""

    start_ms: int
    end_ms: int
    tenant: str | None = None
    model: str | None = None
    model_version: str | None = None
    eval_fraction: float = 0.1
    sources: tuple[str, ...] = SOURCES
    min_agreement: float = 0.75
    rating_good: float = 4.0
    rating_bad: float = 2.0
    near_duplicate: float = 0.92
    use_embeddings: bool = True  # merge near-duplicate prompts with cached embeddings (prompt_embeddings)
    max_pairs: int | None = None  # newest pairs kept when more match
    exclude_tenants: tuple[str, ...] = ()  # tenants whose feedback must not be read (private to their adapters)

    def __post_init__(self) -> None:
        if self.end_ms <= self.start_ms:
            raise InvalidRequest(f"empty window: end_ms {self.end_ms} <= start_ms {self.start_ms}", param="end_ms")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise InvalidRequest("eval_fraction must be in [0, 1)", param="eval_fraction")
        unknown = set(self.sources) - set(SOURCES)
        if unknown:
            raise InvalidRequest(f"unknown sources {sorted(unknown)}; known: {', '.join(SOURCES)}", param="sources")

    def rules(self) -> PairRules:
        return PairRules(sources=tuple(self.sources), min_agreement=self.min_agreement, rating_good=self.rating_good,
                         rating_bad=self.rating_bad, near_duplicate=self.near_duplicate)


@dataclass(frozen=True, slots=True)
class StoreRows:
    """What the SQL read: inferences by id, feedback rows, and the queries (with parameters) that read them."""

    inferences: dict[str, InferenceRow]
    feedback: list[FeedbackRow]
    queries: list[dict[str, Any]] = field(default_factory=list)
    vectors: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DatasetSnapshot:
    """A written snapshot: its directory and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    @classmethod
    def load(cls, path: Path | str) -> DatasetSnapshot:
        """Open a snapshot directory; raises FailedPrecondition when it has no readable manifest."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise FailedPrecondition(f"{path} is not a dataset snapshot (no readable {MANIFEST}): {e}") from e
        return cls(path, manifest)

    def pairs(self, split: str = "train") -> list[dict[str, Any]]:
        """Preference pairs of `split` (`train` or `eval`) as records (prompt as a list of messages)."""
        return pq.read_table(self.path / f"{split}.parquet").to_pylist()

    def sft(self, split: str = "train") -> list[dict[str, Any]]:
        return pq.read_table(self.path / f"sft_{split}.parquet").to_pylist()


# --- the edge: SQL ---------------------------------------------------------------------------------------

_WINDOW = ("ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') "
           "AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')")
_FEEDBACK_SQL = """
SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms, tenant, target_id, kind, thumbs, rating, correction,
       preferred_id, other_id
FROM feedback FINAL
WHERE {window}{tenant}
  AND kind IN ('thumbs', 'rating', 'correction', 'preference')
ORDER BY ts, event_id
LIMIT 1 BY tenant, if(idempotency_key = '', event_id, idempotency_key)"""
_INFERENCE_COLUMNS = ("event_id, toUnixTimestamp64Milli(ts) AS ts_ms, tenant, model_version, operation, prompt, "
                      "messages, response, status, output_action")
_INFERENCES_BY_ID_SQL = """
SELECT {columns}
FROM inferences FINAL
WHERE event_id IN {{ids:Array(String)}}{tenant}{model}"""
_FLAGGED_SQL = """
SELECT {columns}
FROM inferences FINAL
WHERE {window}{tenant}{model} AND NOT shadow AND output_action IN ('block', 'redact')
ORDER BY ts, event_id"""
# Safe answers to the prompts the guardrails flagged: same user text (exact, normalised in Python after).
_SAFE_SQL = """
SELECT {columns}
FROM inferences FINAL
WHERE {window}{tenant}{model} AND NOT shadow AND output_action = 'allow' AND status = 'ok' AND response != ''
  AND lowerUTF8(trimBoth({prompt_text})) IN {{texts:Array(String)}}
ORDER BY ts, event_id"""


def _filters_sql(f: DatasetFilters) -> tuple[dict[str, str], dict[str, ParamValue]]:
    parts = {"window": _WINDOW, "tenant": "", "model": "", "columns": _INFERENCE_COLUMNS}
    params: dict[str, ParamValue] = {"start_ms": f.start_ms, "end_ms": f.end_ms}
    if f.tenant is not None:
        parts["tenant"] = " AND tenant = {tenant:String}"
        params["tenant"] = f.tenant
    if f.exclude_tenants:
        parts["tenant"] += " AND tenant NOT IN {exclude_tenants:Array(String)}"
        params["exclude_tenants"] = list(f.exclude_tenants)
    if f.model is not None:
        parts["model"] += " AND model = {model:String}"
        params["model"] = f.model
    if f.model_version is not None:
        parts["model"] += " AND model_version = {model_version:String}"
        params["model_version"] = f.model_version
    return parts, params


def _inference_rows(table: pa.Table) -> list[InferenceRow]:
    out = []
    for r in table.to_pylist():
        msgs = tuple((m["role"], m["content"]) for m in r["messages"] or ())
        if r["operation"] == "text_completion" or not msgs:
            msgs = (("user", r["prompt"]),)
        out.append(InferenceRow(r["event_id"], int(r["ts_ms"]), r["tenant"], msgs, r["response"], r["status"],
                                r["output_action"], r["model_version"]))
    return out


async def read_rows(store: Store, filters: DatasetFilters) -> StoreRows:
    """Read the feedback in the window and every inference pair building may use (the imperative shell)."""
    from feedback.monitors.embeddings import PROMPT_TEXT_SQL, cached_embeddings

    parts, params = _filters_sql(filters)
    queries: list[dict[str, Any]] = []

    async def run(sql: str, p: dict[str, ParamValue], name: str) -> pa.Table:
        queries.append({"name": name, "sql": sql.strip(), "params": {k: v for k, v in p.items() if k != "ids"}})
        return await store.query(sql, p)

    fb_sql = _FEEDBACK_SQL.format(window=parts["window"], tenant=parts["tenant"])
    fb_params = {k: v for k, v in params.items() if k in ("start_ms", "end_ms", "tenant", "exclude_tenants")}
    feedback = [FeedbackRow(r["event_id"], int(r["ts_ms"]), r["tenant"], r["target_id"], r["kind"], r["thumbs"],
                            r["rating"], r["correction"], r["preferred_id"], r["other_id"])
                for r in (await run(fb_sql, fb_params, "feedback")).to_pylist()]
    ids = sorted({i for f in feedback for i in (f.target_id, f.preferred_id, f.other_id) if i})
    inferences: dict[str, InferenceRow] = {}
    if ids:
        sql = _INFERENCES_BY_ID_SQL.format(**parts)
        p = {k: v for k, v in params.items() if k not in ("start_ms", "end_ms")} | {"ids": ids}
        inferences.update((r.event_id, r) for r in _inference_rows(await run(sql, p, "rated_inferences")))
    if "guardrail" in filters.sources:
        flagged = _inference_rows(await run(_FLAGGED_SQL.format(**parts), dict(params), "flagged_inferences"))
        inferences.update((r.event_id, r) for r in flagged)
        texts = sorted({r.prompt_text.strip().lower() for r in flagged})
        if texts:
            sql = _SAFE_SQL.format(**parts, prompt_text=PROMPT_TEXT_SQL)
            safe = _inference_rows(await run(sql, dict(params) | {"texts": texts}, "safe_answers"))
            inferences.update((r.event_id, r) for r in safe)
    vectors: dict[str, Any] = {}
    if filters.use_embeddings and "rating" in filters.sources and inferences:
        vectors = await cached_embeddings(store, sorted(inferences))
    return StoreRows(inferences, feedback, queries, vectors)


# --- the core, applied -----------------------------------------------------------------------------------

def assemble(rows: StoreRows, filters: DatasetFilters) -> BuiltDataset:
    """Pairs and SFT examples from the rows read (pure)."""
    groups = group_prompts(list(rows.inferences.values()), rows.vectors or None, filters.near_duplicate)
    built = build_pairs(rows.inferences, rows.feedback, rules=filters.rules(), groups=groups)
    if filters.max_pairs is not None and len(built.pairs) > filters.max_pairs:
        built = BuiltDataset(built.pairs[-filters.max_pairs:], built.sft, built.dropped)
    return built


def assert_redacted(texts: Sequence[str], policy: Any = None) -> None:
    """Raise UnredactedText when any text holds a finding the output guardrails would redact.

    The store only ever holds redacted text; this catches a dataset built from anything else.
    """
    from guardrails import default_policy_set

    policy = policy or default_policy_set().resolve("", "")
    for n, text in enumerate(texts):
        if not text:
            continue
        verdict = policy.check_output(text)
        kinds = sorted({f.type for f in verdict.findings if f.action == "redact"})
        if kinds:
            raise UnredactedText(f"dataset text #{n} holds unredacted {', '.join(kinds)}",
                                 details={"index": n, "types": kinds})


def _canonical(records: list[dict[str, Any]]) -> bytes:
    return json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def content_sha256(train: Sequence[PreferencePair], eval_: Sequence[PreferencePair],
                   sft_train: Sequence[SftExample], sft_eval: Sequence[SftExample]) -> str:
    """SHA-256 over the canonical JSON of every split: the snapshot's identity (same rows, same hash)."""
    h = hashlib.sha256()
    for name, items in (("train", train), ("eval", eval_), ("sft_train", sft_train), ("sft_eval", sft_eval)):
        h.update(name.encode() + b"\0" + _canonical([i.record() for i in items]) + b"\0")
    return h.hexdigest()


_MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_PAIR_SCHEMA = pa.schema([("prompt", _MSG), ("chosen", pa.string()), ("rejected", pa.string()),
                          ("source", pa.string()), ("ts_ms", pa.int64()), ("tenant", pa.string()),
                          ("feedback_ids", pa.list_(pa.string())), ("inference_ids", pa.list_(pa.string()))])
_SFT_SCHEMA = pa.schema([("prompt", _MSG), ("completion", pa.string()), ("source", pa.string()),
                         ("ts_ms", pa.int64()), ("tenant", pa.string()), ("feedback_ids", pa.list_(pa.string())),
                         ("inference_ids", pa.list_(pa.string()))])


def _write(path: Path, items: Sequence[PreferencePair] | Sequence[SftExample], schema: pa.Schema) -> None:
    pq.write_table(pa.Table.from_pylist([i.record() for i in items], schema=schema), path, compression="zstd")


def write_snapshot(built: BuiltDataset, out_root: Path, *, filters: DatasetFilters | None = None,
                   queries: Sequence[dict[str, Any]] = (), eval_fraction: float | None = None,
                   check_redacted: bool = True) -> DatasetSnapshot:
    """Split `built` by time and write it under `out_root/<sha256[:16]>` (kept as is when it exists).

    Raises EmptyDataset when there is no pair and no example, UnredactedText (see `assert_redacted`).
    """
    if not built.pairs and not built.sft:
        raise EmptyDataset("no preference pair or SFT example matched the filters", details={"dropped": built.dropped})
    frac = eval_fraction if eval_fraction is not None else filters.eval_fraction if filters else 0.1
    if check_redacted:
        assert_redacted([t for p in built.pairs for t in (p.chosen, p.rejected, *(c for _, c in p.prompt))]
                        + [t for e in built.sft for t in (e.completion, *(c for _, c in e.prompt))])
    train, eval_ = time_split(built.pairs, frac)
    sft_train, sft_eval = time_split(built.sft, frac)
    digest = content_sha256(train, eval_, sft_train, sft_eval)
    counts: dict[str, Any] = {
        "pairs": len(built.pairs), "train": len(train), "eval": len(eval_),
        "sft": len(built.sft), "sft_train": len(sft_train), "sft_eval": len(sft_eval),
        "by_source": {s: sum(1 for p in built.pairs if p.source == s) for s in SOURCES},
        "sft_by_source": {s: sum(1 for e in built.sft if e.source == s) for s in ("correction", "rating")},
        "dropped": built.dropped,
    }
    feedback_ids = sorted({i for p in built.pairs for i in p.feedback_ids} | {i for e in built.sft for i in e.feedback_ids})
    manifest = {
        "format_version": FORMAT_VERSION, "sha256": digest,
        "window_start_ms": filters.start_ms if filters else min((p.ts_ms for p in built.pairs), default=0),
        "window_end_ms": filters.end_ms if filters else max((p.ts_ms for p in built.pairs), default=0) + 1,
        "filters": asdict(filters) if filters else {}, "eval_fraction": frac,
        "eval_cut_ms": min((p.ts_ms for p in eval_), default=None),
        "counts": counts, "queries": list(queries), "feedback_ids": feedback_ids,
    }
    final = Path(out_root) / digest[:16]
    if (final / MANIFEST).exists():
        return DatasetSnapshot.load(final)
    staging = Path(out_root) / f".{digest[:16]}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write(staging / "train.parquet", train, _PAIR_SCHEMA)
    _write(staging / "eval.parquet", eval_, _PAIR_SCHEMA)
    _write(staging / "sft_train.parquet", sft_train, _SFT_SCHEMA)
    _write(staging / "sft_eval.parquet", sft_eval, _SFT_SCHEMA)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=list) + "\n")
    try:
        staging.rename(final)
    except OSError:  # another writer got there first with the same content
        shutil.rmtree(staging, ignore_errors=True)
    return DatasetSnapshot.load(final)


async def build_snapshot(store: Store, filters: DatasetFilters, out_root: Path) -> DatasetSnapshot:
    """Read the store, build pairs and examples, write the snapshot. Raises EmptyDataset, UnredactedText."""
    rows = await read_rows(store, filters)
    built = assemble(rows, filters)
    return write_snapshot(built, out_root, filters=filters, queries=rows.queries)
