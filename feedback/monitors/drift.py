"""Drift monitors: a reference window against a current window of requests, per model (and version).

Two checks per group, both with Evidently (0.7 API):

* tabular: request features (feedback/monitors/request_features.py: prompt/response length, token
  counts, charset/script mix, language guess, guardrail actions and finding types, sampling
  parameters) through Evidently's per-column `ValueDrift`:
  one drift score per column (its stat test and threshold chosen by Evidently by column type and
  sample size) and the dataset-drift flag (share of drifted columns >= `drift_share`, as
  `DataDriftPreset` decides it, without the preset computing every column twice);
* embeddings: prompt embeddings (feedback/monitors/embeddings.py, cached per event id) compared with
  Evidently's embedding-drift method (`model`: a classifier's ROC AUC at telling the windows apart,
  above a margin and above its no-drift null quantile; or `mmd`).

Each window is sampled deterministically (by event-id hash, so a repeated cycle reuses the same cached
embeddings) to bound the cost. An Evidently HTML report is saved per run and named in every result's
`details["report"]`. Statuses: a drifted column is `warn`; dataset drift and embedding drift are
`alert`; a window under `min_samples` gives `insufficient_data`. The runner owns what a status leads to.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import msgspec
import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from feedback.monitors.base import MonitorWindow, TimeRange
from feedback.monitors.embeddings import (
    EmbeddedPrompts,
    PromptEmbedder,
    embed_prompts,
    prompt_texts,
)
from feedback.monitors.request_features import (
    Group,
    WindowSample,
    feature_frames,
    sample_window,
    window_groups,
)
from feedback.store.base import Store
from schemas.events import MonitorResult

MONITOR = "drift"
DATASET_METRIC = "dataset_drift"
EMBEDDING_METRIC = "prompt_embedding_drift"
COLUMN_PREFIX = "column:"


class DriftSettings(BaseModel):
    """What the drift monitor compares and how much it reads. Thresholds not set here are Evidently's defaults."""

    tabular: bool = True
    embeddings: bool = Field(True, description="embedding drift of prompts (off: --no-embeddings)")
    embed_missing: bool = Field(True, description="embed prompts without a cached embedding (off: cache only)")
    per_version: bool = Field(False, description="one group per (model, version) instead of per model")
    max_rows: int = Field(5_000, ge=10, description="rows sampled per window for the tabular drift")
    stat_rows: int | None = Field(
        20_000, ge=10, description="at most this many of them go through the per-column tests (the first in "
                                   "event-id hash order: a uniform subsample); the tests decide the same on 20k "
                                   "rows as on 100k at a fifth of the cost. None: all max_rows")
    max_embeddings: int = Field(2_000, ge=10, description="prompts sampled per window for embedding drift")
    min_samples: int = Field(100, ge=2, description="fewer rows in either window: insufficient_data")
    drift_share: float = Field(0.5, gt=0, le=1, description="dataset drift when this share of columns drifts")
    column_method: str | None = Field(None, description="Evidently stat test for every column (None: by type)")
    column_threshold: float | None = None
    max_guardrail_types: int = Field(20, ge=0, description="finding types one-hot encoded (most frequent first)")
    embedding_method: Literal["model", "mmd"] = "model"
    embedding_threshold: float | None = Field(
        None, description="model: minimum ROC AUC (0.55); mmd: MMD^2 (0.015); None: Evidently's default")
    embedding_quantile: float = Field(
        0.99, gt=0.5, lt=1, description="model: also require AUC above this quantile of its no-drift null")
    embedding_pca_components: int | None = Field(
        None, ge=2, description="project embeddings on this many principal components before the method "
                                "(None: only past embedding_reduce_above rows, then 32)")
    embedding_reduce_above: int = Field(
        20_000, ge=0, description="both windows together above this many embeddings: project them first (the "
                                  "method's cost grows with rows x dimensions; 384 -> 32 keeps its power)")
    examples: int = Field(5, ge=0, le=50, description="current prompts least like the reference, in details")
    html_report: bool = True
    reports_kept: int = Field(500, ge=1, description="newest drift HTML reports kept in the report dir (~4 MB each)")


@dataclass
class DriftRun:
    """Everything one group's run found, before it becomes MonitorResults (pure data, for tests too)."""

    columns: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> score, method, threshold, drifted
    drifted_share: float = 0.0
    drifted_count: int = 0
    report: str = ""


def prune_reports(report_dir: Path, keep: int) -> int:
    """Delete all but the `keep` newest drift reports in `report_dir`; return how many went.

    Each Evidently report inlines its scripts (~4 MB); results older than the kept reports then link
    to a missing file, which the dashboard shows as such.
    """
    reports = sorted(report_dir.glob("drift-*.html"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    for old in reports[keep:]:
        old.unlink(missing_ok=True)
    return max(len(reports) - keep, 0)


def _as_range(r: TimeRange | tuple[int, int]) -> TimeRange:
    return r if isinstance(r, TimeRange) else TimeRange(int(r[0]), int(r[1]))


def tabular_drift(reference: pd.DataFrame, current: pd.DataFrame, numerical: list[str], categorical: list[str],
                  settings: DriftSettings, report_path: Path | None) -> DriftRun:
    """Evidently's per-column drift (`ValueDrift`) over the feature frames: scores and the dataset flag (blocking).

    One `ValueDrift` per column, not `DataDriftPreset`: the preset computes each column's drift again for
    its `DriftedColumnsCount` (2.4 s against 1.1 s of CPU on 100k + 40k rows); the count and share of
    drifted columns are taken from the same per-column tests here.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    run = DriftRun()
    columns = numerical + categorical
    if not columns:
        return run
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    report = Report([ValueDrift(column=c, method=settings.column_method, threshold=settings.column_threshold)
                     for c in columns], include_tests=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy/scipy chatter on near-constant columns
        snapshot = report.run(current_data=Dataset.from_pandas(current, data_definition=definition),
                              reference_data=Dataset.from_pandas(reference, data_definition=definition))
        if report_path is not None:
            snapshot.save_html(str(report_path))
            run.report = str(report_path)
    result = snapshot.dict()
    failed = {t["metric_config"]["metric_id"] for t in result.get("tests", []) if t.get("status") == "FAIL"}
    for metric in result["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            run.columns[config["column"]] = {
                "score": float(metric["value"]), "method": config.get("method") or "",
                "threshold": float(config.get("threshold") or 0.0), "drifted": metric["id"] in failed,
            }
    run.drifted_count = sum(c["drifted"] for c in run.columns.values())
    run.drifted_share = run.drifted_count / len(run.columns) if run.columns else 0.0
    return run


def auc_null_quantile(n_reference: int, n_current: int, quantile: float) -> float:
    """The `quantile` of a held-out ROC AUC when both windows come from one distribution.

    Evidently's `model` method scores on a random half of the rows; without drift that AUC follows the
    Mann-Whitney null, mean 0.5 and sd sqrt((n1 + n2 + 1) / (12 n1 n2)) with n1, n2 the held-out rows
    of each window. Evidently's own `bootstrap=True` estimates the same quantile from 100 random
    scorings (~1 s for 2k + 2k rows); the normal approximation is exact enough at these sizes and free.
    """
    n1, n2 = max(n_reference // 2, 1), max(n_current // 2, 1)
    return 0.5 + NormalDist().inv_cdf(quantile) * math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))


REDUCED_COMPONENTS = 32
PCA_FIT_ROWS = 4_000


def project(reference: np.ndarray, current: np.ndarray, components: int,
            fit_rows: int = PCA_FIT_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Both windows on the `components` principal axes of a sample of both (`fit_rows` of each, in hash order).

    Evidently's own `pca_components` fits on every row (seconds at 100k x 384); the axes of a few thousand
    rows of each window are as good for telling the windows apart, and projecting is one matrix product.
    """
    from sklearn.decomposition import PCA

    sample = np.concatenate([reference[:fit_rows], current[:fit_rows]])
    pca = PCA(components, svd_solver="randomized", random_state=0).fit(sample)
    axes = pca.components_.T.astype(np.float32)
    shift = pca.mean_.astype(np.float32) @ axes  # (x - mean) @ axes without a centred copy of x
    return reference @ axes - shift, current @ axes - shift


def embedding_drift(reference: np.ndarray, current: np.ndarray, settings: DriftSettings) -> dict[str, Any]:
    """Evidently's embedding-drift method on two embedding matrices (blocking): score, threshold, drifted.

    `model` drifts when the classifier's AUC exceeds both the threshold (a useful margin) and its
    no-drift null quantile (not chance, which matters for small windows); `mmd` when MMD^2 > threshold.
    """
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the matrices are small enough that OpenBLAS's threads mostly spin, and on a busy
    # 2-core machine they cost 2.5-8.6 s of CPU here against 1.1 s single-threaded (100k + 40k rows).
    with threadpool_limits(1, user_api="blas"):
        return _embedding_drift(reference, current, settings)


def _embedding_drift(reference: np.ndarray, current: np.ndarray, settings: DriftSettings) -> dict[str, Any]:
    from evidently.metrics.embeddings import MMDDriftMethod, ModelDriftMethod

    threshold = settings.embedding_threshold
    bound = None
    components = settings.embedding_pca_components
    if components is None and len(reference) + len(current) > settings.embedding_reduce_above:
        components = REDUCED_COMPONENTS
    if components is not None and components < reference.shape[1]:
        reference, current = project(reference, current, components)
    if settings.embedding_method == "mmd":
        threshold = 0.015 if threshold is None else threshold
        method: Any = MMDDriftMethod(threshold=threshold)
    else:
        threshold = 0.55 if threshold is None else threshold
        bound = auc_null_quantile(len(reference), len(current), settings.embedding_quantile)
        method = ModelDriftMethod(threshold=max(threshold, bound))
    cur, ref = pd.DataFrame(current.astype(np.float64)), pd.DataFrame(reference.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score, drifted, name = method(cur, ref)
    return {"score": float(score), "threshold": float(threshold), "drifted": bool(drifted), "method": name,
            "null_quantile": bound, "quantile": settings.embedding_quantile if bound is not None else None}


NOVELTY_SAMPLE = 4_000
NOVELTY_MAX_CHARS = 200


def novel_prompts(reference: np.ndarray, current: np.ndarray, texts: Sequence[str], k: int,
                  max_chars: int = NOVELTY_MAX_CHARS, *, sample: int = NOVELTY_SAMPLE) -> list[dict[str, Any]]:
    """The `k` distinct current prompts least like any reference prompt, as evidence for an operator.

    Embeddings are L2-normalised, so similarity is a dot product; each prompt is scored by its nearest
    reference prompt. Texts are the stored (redacted) prompts, cut to `max_chars`. At most `sample`
    distinct current prompts are scored against at most `sample` reference rows (windows arrive in
    event-id hash order, so the first rows are a uniform sample): the cost is bounded by sample² · dim
    instead of growing with both windows (40k x 100k rows took minutes of a 2-core machine).
    """
    if k <= 0 or len(reference) == 0 or len(current) == 0:
        return []
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        if len(first) == sample:
            break
        first.setdefault(t[:max_chars], i)
    prompts = list(first)
    rows = np.fromiter(first.values(), dtype=np.intp, count=len(first))
    nearest = (current[rows] @ reference[:sample].T).max(axis=1)
    return [{"prompt": prompts[j], "nearest_similarity": round(float(nearest[j]), 3)}
            for j in np.argsort(nearest, kind="stable")[:k]]


async def novelty_texts(store: Store, event_ids: Sequence[str], *, max_chars: int = NOVELTY_MAX_CHARS,
                        sample: int = NOVELTY_SAMPLE) -> list[str]:
    """The texts of the first of `event_ids` up to `sample` distinct ones (what `novel_prompts` scores), read in
    slices: the window's other prompts are never read (their embeddings are cached)."""
    texts: list[str] = []
    distinct: set[str] = set()
    while len(texts) < len(event_ids) and len(distinct) < sample:
        got = await prompt_texts(store, event_ids[len(texts): len(texts) + 2 * sample])
        texts += got
        distinct.update(t[:max_chars] for t in got)
    return texts


class DriftDetector:
    """Runs drift checks against a store; holds the (lazily loaded) prompt embedder between runs."""

    kind = MONITOR

    def __init__(self, settings: DriftSettings | None = None, *, report_dir: Path | str | None = None,
                 embedder: PromptEmbedder | None = None):
        self.settings = settings or DriftSettings()
        # absolute, so a result names its report wherever it is read (the dashboard serves it from there)
        self.report_dir = Path(report_dir).resolve() if report_dir is not None else None
        self._embedder = embedder

    @property
    def embedder(self) -> PromptEmbedder | None:
        if not (self.settings.embeddings and self.settings.embed_missing):
            return None
        if self._embedder is None:
            self._embedder = PromptEmbedder()
        return self._embedder

    async def warm_up(self) -> None:
        """Import Evidently (~5-7 s on 2 cores) and load the embedder now, off the loop, so a first cycle does not pay."""

        def load() -> None:
            import evidently.metrics.embeddings  # noqa: F401

            tiny = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "c": ["a", "b", "a", "b"]})
            tabular_drift(tiny, tiny, ["x"], ["c"], self.settings, None)  # first-run setup inside Evidently/plotly
            if self.embedder is not None:
                self.embedder.load()

        await asyncio.to_thread(load)

    async def run(self, store: Store, window: MonitorWindow, policy: Any = None) -> list[MonitorResult]:
        """The `Monitor` contract: baseline vs current of `window` for every model in the current window.

        Results name their model; the runner keeps those its policy entry applies to.
        """
        return await self.detect(store, reference=window.baseline, current=window.current)

    async def detect(self, store: Store, *, reference: TimeRange | tuple[int, int],
                     current: TimeRange | tuple[int, int], model: str | None = None,
                     model_version: str | None = None) -> list[MonitorResult]:
        """Drift of `current` against `reference` for one model (and version), or every model seen in `current`.

        Returns the results of every group (columns, dataset drift, embedding drift); writes nothing to the
        store but prompt embeddings it had to compute. Raises StoreError/StoreUnavailable from the store.
        """
        ref_range, cur_range = _as_range(reference), _as_range(current)
        results: list[MonitorResult] = []
        for group in await window_groups(store, cur_range, per_version=self.settings.per_version, model=model,
                                             model_version=model_version):
            results += await self._detect_group(store, ref_range, cur_range, group)
        return results

    async def _detect_group(self, store: Store, ref_range: TimeRange, cur_range: TimeRange,
                            group: Group) -> list[MonitorResult]:
        s = self.settings
        rows = min(s.max_rows, s.stat_rows or s.max_rows)
        size = {"rows": rows if s.tabular else 0, "prompts": s.max_embeddings if s.embeddings else 0}
        ref = await sample_window(store, ref_range, group, **size)
        cur = await sample_window(store, cur_range, group, **size)
        base = {"monitor": MONITOR, "model": group.model, "model_version": group.model_version,
                "window_start_ms": cur_range.start_ms, "window_end_ms": cur_range.end_ms}
        evidence = {"reference_start_ms": ref_range.start_ms, "reference_end_ms": ref_range.end_ms,
                    "baseline_sample_size": ref.rows}

        def result(metric: str, value: float, threshold: float, status: str, sample: int,
                   details: dict[str, Any]) -> MonitorResult:
            return MonitorResult(metric=metric, value=value, threshold=threshold, status=status,  # type: ignore[arg-type]
                                 sample_size=sample, details=msgspec.json.encode({**evidence, **details}).decode(),
                                 **base)

        if min(ref.rows, cur.rows) < s.min_samples:
            metrics = ([DATASET_METRIC] if s.tabular else []) + ([EMBEDDING_METRIC] if s.embeddings else [])
            return [result(m, 0.0, 0.0, "insufficient_data", cur.rows, {"min_samples": s.min_samples})
                    for m in metrics]

        report_path = None
        if s.html_report and s.tabular and self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            label = re.sub(r"[^0-9A-Za-z._-]+", "_", f"{group.model}-{group.model_version or 'all'}")
            report_path = self.report_dir / f"drift-{label}-{cur_range.end_ms}-{uuid.uuid4().hex[:8]}.html"

        # Side by side: the embedding cache read runs on chDB's threads (no GIL) while Evidently's column
        # tests hold the interpreter, and each check's compute is single-threaded.
        async def nothing() -> list[MonitorResult]:
            return []

        tabular, embedded = await asyncio.gather(
            self._tabular_results(ref, cur, report_path, result) if s.tabular else nothing(),
            self._embedding_result(store, ref, cur, str(report_path or ""), result) if s.embeddings else nothing())
        out = tabular + embedded
        if report_path is not None:
            await asyncio.to_thread(prune_reports, report_path.parent, s.reports_kept)
        return out

    async def _tabular_results(self, ref: WindowSample, cur: WindowSample, report_path: Path | None,
                               result: Any) -> list[MonitorResult]:
        s = self.settings
        ref_f, cur_f, num, cat, dropped = feature_frames(ref.frame, cur.frame, max_guardrail_types=s.max_guardrail_types)
        run = await asyncio.to_thread(tabular_drift, ref_f, cur_f, num, cat, s, report_path)
        common = {"report": run.report, "sampled": [len(ref_f), len(cur_f)]}
        out = [result(COLUMN_PREFIX + name, col["score"], col["threshold"], "warn" if col["drifted"] else "ok",
                      cur.rows, {**common, "column": name, "method": col["method"], "drifted": col["drifted"]})
               for name, col in run.columns.items()]
        dataset_drift = bool(run.columns) and run.drifted_share >= s.drift_share
        out.append(result(DATASET_METRIC, run.drifted_share, s.drift_share, "alert" if dataset_drift else "ok",
                          cur.rows, {**common, "dataset_drift": dataset_drift, "drifted_columns": run.drifted_count,
                                     "columns": len(run.columns), "skipped_constant": dropped,
                                     "drifted": sorted(c for c, v in run.columns.items() if v["drifted"]),
                                     # per feature, for the dashboard (a policy entry keeps only its own metric)
                                     "column_scores": {c: {k: v[k] for k in ("score", "threshold", "method", "drifted")}
                                                       for c, v in run.columns.items()}}))
        return out

    async def _embedding_result(self, store: Store, ref: WindowSample, cur: WindowSample, report: str,
                                result: Any) -> list[MonitorResult]:
        s = self.settings
        embedder = self.embedder
        got: list[EmbeddedPrompts] = [await embed_prompts(store, ref.prompts, embedder),
                                      await embed_prompts(store, cur.prompts, embedder)]
        counts = {"embedded_now": sum(g.embedded_now for g in got), "missing": sum(g.missing for g in got),
                  "embedding_samples": [len(g.event_ids) for g in got], "report": report}
        if min(len(g.event_ids) for g in got) < s.min_samples:
            return [result(EMBEDDING_METRIC, 0.0, 0.0, "insufficient_data", len(got[1].event_ids),
                           {**counts, "min_samples": s.min_samples})]
        verdict = await asyncio.to_thread(embedding_drift, got[0].vectors, got[1].vectors, s)
        if s.examples:
            texts = await novelty_texts(store, got[1].event_ids)
            verdict["novel_prompts"] = await asyncio.to_thread(
                novel_prompts, got[0].vectors, got[1].vectors[: len(texts)], texts, s.examples)
        return [result(EMBEDDING_METRIC, verdict["score"], verdict["threshold"],
                       "alert" if verdict["drifted"] else "ok", len(got[1].event_ids), {**counts, **verdict})]


async def run_drift(store: Store, *, reference: TimeRange | tuple[int, int], current: TimeRange | tuple[int, int],
                    settings: DriftSettings | None = None, report_dir: Path | str | None = None,
                    model: str | None = None, model_version: str | None = None,
                    embedder: PromptEmbedder | None = None) -> list[MonitorResult]:
    """One drift run (see `DriftDetector.detect`); pass a long-lived `embedder` to avoid reloading the model."""
    detector = DriftDetector(settings, report_dir=report_dir, embedder=embedder)
    return await detector.detect(store, reference=reference, current=current, model=model,
                                 model_version=model_version)


def results_by_metric(results: Sequence[MonitorResult]) -> dict[tuple[str, str, str], MonitorResult]:
    """Results keyed by (model, model_version, metric): handy for dashboards and tests."""
    return {(r.model, r.model_version, r.metric): r for r in results}


__all__ = ["DriftDetector", "DriftSettings", "auc_null_quantile", "embedding_drift", "novel_prompts", "project", "prune_reports",
           "run_drift", "tabular_drift"]
