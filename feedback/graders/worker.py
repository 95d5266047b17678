"""The grading worker: sample recent stored inferences no grader has seen, grade them, publish the grades.

    worker = GradingWorker(store, sink_publisher(pipeline.sink), settings.grading)
    await worker.start()          # a cycle every interval_s; or `await worker.run_once()`
    ...
    await worker.aclose()

Never on the request path: it reads the store (what the ingester wrote) and publishes `GradeEvent`s
through `publish` (the event sink, so grades travel Kafka -> ClickHouse like every event; or the store
directly). Per grader (settings.graders): a sampling rate by a hash of the inference id (reproducible,
the same sample in every process), tenant/model filters, a per-cycle cap and an hourly budget. Batches
of all graders share `concurrency` slots. Grades not yet in the store (published via Kafka moments ago)
are remembered in memory, so a fast next cycle does not grade them twice; a restart may re-grade a
few, and the grade monitor counts each inference's latest grade per grader once.

Grading lag (grade time - inference time) is a Prometheus histogram per grader, and in each report.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from feedback.graders.base import Embedder, Grader, GraderUnavailable
from feedback.graders.export import GradeExporter
from feedback.graders.judge import PAIRWISE_GRADER_NAME, PairwiseGrader
from feedback.graders.settings import GraderSettings, GradingSettings
from feedback.store.base import ParamValue, Store
from feedback.store.columns import from_arrow, select_list
from feedback.tasks import stop_tasks
from schemas.errors import ConfigError
from schemas.events import Event, GradeEvent, InferenceEvent, now_ms

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Event]], Awaitable[object]]
_PPM = 1_000_000
_CONTEXT_SQL = ("arrayExists(m -> tupleElement(m, 'role') IN ('system', 'context', 'document', 'tool'), messages)")
# What a pair has in common: the completion prompt or the chat's user turns (as feedback/monitors/embeddings).
_QUESTION_SQL = ("if(prompt != '', prompt, arrayStringConcat(arrayMap(m -> tupleElement(m, 'content'), "
                 "arrayFilter(m -> tupleElement(m, 'role') = 'user', messages)), '\\n'))")
# Extra filters per grader: groundedness only sees requests that carry reference context.
GRADER_FILTERS: dict[str, str] = {"groundedness": _CONTEXT_SQL}


def build_graders(settings: GradingSettings, embedder: Embedder | None = None) -> dict[str, Grader]:
    """The bundled graders that `settings` enables, sharing one embedder (loaded on first use).

    A grader whose model is missing (no toxicity head) is left out with a warning.
    """
    from feedback.graders.groundedness import GroundednessGrader
    from feedback.graders.judge import RuleJudge

    enabled = {n for n, g in settings.graders.items() if g.enabled}
    if embedder is None and enabled & {"toxicity", "groundedness"}:
        from feedback.monitors.embeddings import PromptEmbedder

        embedder = PromptEmbedder()
    out: dict[str, Grader] = {}
    if "toxicity" in enabled:
        from feedback.graders.toxicity import ToxicityGrader

        try:
            out["toxicity"] = ToxicityGrader(embedder)  # type: ignore[arg-type]
        except GraderUnavailable as e:
            log.warning("toxicity grader off: %s", e.message)
    if "groundedness" in enabled:
        params = settings.graders["groundedness"].params
        out["groundedness"] = GroundednessGrader(embedder, similarity=float(params.get("similarity", 0.6)))  # type: ignore[arg-type]
    if "judge" in enabled:
        out["judge"] = RuleJudge()
    if "llm_judge" in enabled:  # params: base_url, model, api_key, criteria (an OpenAI-compatible engine)
        from feedback.graders.llm_judge import ChatClient, LLMJudge

        p = settings.graders["llm_judge"].params
        if not p.get("base_url") or not p.get("model"):
            raise ConfigError("grading.graders.llm_judge needs params.base_url and params.model")
        client = ChatClient(str(p["base_url"]), model=str(p["model"]), api_key=str(p.get("api_key", "")))
        out["llm_judge"] = LLMJudge(client, criteria=tuple(p.get("criteria") or
                                                           ("factuality", "coherence", "tone", "helpfulness")))
    if "self_consistency" in enabled:  # params: base_url, model, api_key, samples, temperature, agreement
        from feedback.graders.consistency import SelfConsistencyGrader
        from feedback.graders.llm_judge import ChatClient

        p = settings.graders["self_consistency"].params
        if not p.get("base_url") or not p.get("model"):
            raise ConfigError("grading.graders.self_consistency needs params.base_url and params.model")
        if embedder is None:
            from feedback.monitors.embeddings import PromptEmbedder

            embedder = PromptEmbedder()
        client = ChatClient(str(p["base_url"]), model=str(p["model"]), api_key=str(p.get("api_key", "")))
        out["self_consistency"] = SelfConsistencyGrader(
            client, embedder, samples=int(p.get("samples", 3)), temperature=float(p.get("temperature", 0.8)),
            agreement=float(p.get("agreement", 0.6)))
    return out


class _Budget:
    """Grades per rolling hour (0 = unlimited)."""

    def __init__(self, per_hour: int):
        self.per_hour = per_hour
        self._spent: deque[tuple[float, int]] = deque()

    def left(self, now_s: float) -> int:
        if self.per_hour <= 0:
            return 1 << 30
        while self._spent and self._spent[0][0] <= now_s - 3600:
            self._spent.popleft()
        return max(0, self.per_hour - sum(n for _, n in self._spent))

    def spend(self, now_s: float, n: int) -> None:
        if n:
            self._spent.append((now_s, n))

    @property
    def depth(self) -> int:
        """Entries in the rolling hour's deque (one per grading batch; aged ones go on the next `left`)."""
        return len(self._spent)


class _BudgetCollector:
    """Per grader, the depth of its budget deque (servoloop_grading_budget_queue_depth)."""

    def __init__(self, budgets: dict[str, _Budget]):
        self._budgets = budgets

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("servoloop_grading_budget_queue_depth",
                              "Grading batches remembered for the rolling hour's budget", labels=["grader"])
        for name, budget in list(self._budgets.items()):
            g.add_metric([name], budget.depth)
        yield g


class _Recent:
    """Ids graded lately (bounded), until the store surely holds their grades."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, ids: Sequence[str]) -> None:
        for i in ids:
            self._ids[i] = None
            self._ids.move_to_end(i)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class GradingReport:
    """What one cycle did: grades per grader, lag of those grades (ms), errors by grader."""

    now_ms: int
    graded: dict[str, int] = field(default_factory=dict)
    lag_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped_budget: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    grades: list[GradeEvent] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"now_ms": self.now_ms, "graded": self.graded, "lag_ms": self.lag_ms,
                "skipped_budget": self.skipped_budget, "errors": self.errors, "elapsed_s": round(self.elapsed_s, 3)}


def _lag_stats(grades: Sequence[GradeEvent]) -> dict[str, float]:
    lags = sorted(g.ts_ms - g.inference_ts_ms for g in grades if g.inference_ts_ms)
    if not lags:
        return {}
    return {"p50": float(lags[len(lags) // 2]), "p95": float(lags[min(len(lags) - 1, int(len(lags) * 0.95))]),
            "max": float(lags[-1])}


class GradingWorker:
    """Samples, grades and publishes on a schedule. `graders` default to the bundled ones (build_graders)."""

    def __init__(self, store: Store, publish: Publish, settings: GradingSettings, *,
                 graders: Mapping[str, Grader] | None = None, pair_grader: PairwiseGrader | None = None,
                 embedder: Embedder | None = None, clock: Callable[[], int] = now_ms,
                 registry: CollectorRegistry | None = None, exporters: Sequence[GradeExporter] = ()):
        self.store, self.publish, self.settings = store, publish, settings
        self.exporters = list(exporters)
        self.clock = clock
        self._graders = dict(graders) if graders is not None else None
        self._embedder = embedder
        pairwise = settings.graders.get(PAIRWISE_GRADER_NAME)
        self.pair_grader = pair_grader if pair_grader is not None else (
            PairwiseGrader() if pairwise is not None and pairwise.enabled else None)
        self._budgets: dict[str, _Budget] = {}
        self._recent: dict[str, _Recent] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        registry = registry if registry is not None else CollectorRegistry()
        self.lag = Histogram("servoloop_grading_lag_seconds", "time from an inference to its grade", ["grader"],
                             registry=registry, buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
        self.graded_total = Counter("servoloop_grades", "grades published", ["grader", "label"], registry=registry)
        registry.register(_BudgetCollector(self._budgets))
        self.last_report: GradingReport | None = None
        self.errors: dict[str, str] = {}  # the last failure of each grader still failing (scheduled runs)
        self.cycles = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def graders(self) -> dict[str, Grader]:
        """The graders in use (built, and their shared embedder loaded, on first use: seconds, in a thread)."""
        if self._graders is None:
            self._graders = await asyncio.to_thread(build_graders, self.settings, self._embedder)
        return self._graders

    def _config(self, name: str) -> GraderSettings:
        return self.settings.graders.get(name) or GraderSettings()

    def _filters(self, cfg: GraderSettings, params: dict[str, ParamValue]) -> list[str]:
        clauses = []
        if cfg.tenants:
            clauses.append("tenant IN {tenants:Array(String)}")
            params["tenants"] = list(cfg.tenants)
        if cfg.models:
            clauses.append("model IN {models:Array(String)}")
            params["models"] = list(cfg.models)
        return clauses

    async def ungraded(self, name: str, *, since_ms: int, until_ms: int, limit: int) -> list[InferenceEvent]:
        """Sampled inferences in `[since_ms, until_ms)` without a grade by `name`, oldest first, at most `limit`."""
        cfg = self._config(name)
        recent = self._recent.setdefault(name, _Recent())
        params: dict[str, ParamValue] = {"since": since_ms, "until": until_ms, "ppm": int(cfg.sample_rate * _PPM),
                                         "grader": name, "n": limit + min(len(recent), 10_000)}
        clauses = ["ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')",
                   "ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')",
                   "status = 'ok'", "response != ''", f"cityHash64(event_id) % {_PPM} < {{ppm:UInt64}}",
                   "event_id NOT IN (SELECT target_id FROM grades WHERE grader = {grader:String} "
                   "AND ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC'))",
                   *self._filters(cfg, params)]
        if name in GRADER_FILTERS:
            clauses.append(GRADER_FILTERS[name])
        table = await self.store.query(
            f"SELECT {select_list(InferenceEvent)} FROM inferences FINAL WHERE {' AND '.join(clauses)} "
            "ORDER BY ts, event_id LIMIT {n:UInt64}", params)
        rows: list[InferenceEvent] = from_arrow(InferenceEvent, table)  # type: ignore[assignment]
        return [r for r in rows if r.event_id not in recent][:limit]

    async def ungraded_pairs(self, *, since_ms: int, until_ms: int,
                             limit: int) -> list[tuple[InferenceEvent, InferenceEvent]]:
        """Pairs of answers to the same question by two versions of one model (sampled by a hash of the question).

        Shadow replays (gateway/shadow.py) pair with the served inference they replay: `a` the served answer,
        `b` the shadow's (sampled by a hash of the served id), each one graded. Among served answers, per
        (tenant, model, question) the latest answer of each version; the two lowest versions (by name) form
        one pair, `a` the lower. Pairs whose `a` already has a pairwise grade are left out.
        """
        cfg = self._config(PAIRWISE_GRADER_NAME)
        recent = self._recent.setdefault(PAIRWISE_GRADER_NAME, _Recent())
        params: dict[str, ParamValue] = {"since": since_ms, "until": until_ms, "ppm": int(cfg.sample_rate * _PPM),
                                         "grader": PAIRWISE_GRADER_NAME, "n": limit}
        window = ["ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')",
                  "ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')", "status = 'ok'", "response != ''",
                  *self._filters(cfg, params)]
        clauses = [*window, f"cityHash64(tenant, model, {_QUESTION_SQL}) % {_PPM} < {{ppm:UInt64}}"]
        shadow_clauses = ["shadow", *window, f"cityHash64(shadow_of) % {_PPM} < {{ppm:UInt64}}",
                          "shadow_of NOT IN (SELECT target_id FROM grades WHERE grader = {grader:String} "
                          "AND ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC'))"]
        shadow = await self.store.query(
            f"SELECT shadow_of, event_id FROM inferences FINAL WHERE {' AND '.join(shadow_clauses)} "
            "ORDER BY ts, event_id LIMIT {n:UInt64}", params)
        table = await self.store.query(f"""
            WITH latest AS (
                SELECT tenant, model, {_QUESTION_SQL} AS question, model_version,
                       argMax(event_id, (ts, event_id)) AS id
                FROM inferences FINAL WHERE NOT shadow AND {' AND '.join(clauses)}
                GROUP BY tenant, model, question, model_version
            )
            SELECT arrayMap(x -> x.2, arraySort(x -> x.1, groupArray((model_version, id)))) AS sides
            FROM latest GROUP BY tenant, model, question HAVING length(sides) >= 2
            ORDER BY min(id) LIMIT {{n:UInt64}}""", params)
        chosen: dict[str, str] = {}  # one pairwise grade per served answer: its shadow's first, else a version's
        for a, b in [*zip(shadow.column("shadow_of").to_pylist(), shadow.column("event_id").to_pylist(), strict=True),
                     *((s[0], s[1]) for s in table.column("sides").to_pylist())]:
            chosen.setdefault(a, b)
        pairs = list(chosen.items())[:limit]
        if not pairs:
            return []
        graded = set((await self.store.query(
            "SELECT DISTINCT target_id FROM grades WHERE grader = {grader:String} AND target_id IN {ids:Array(String)}",
            {"grader": PAIRWISE_GRADER_NAME, "ids": [a for a, _ in pairs]})).column("target_id").to_pylist())
        pairs = [(a, b) for a, b in pairs if a not in graded and a not in recent]
        ids = [i for p in pairs for i in p]
        if not ids:
            return []
        found = from_arrow(InferenceEvent, await self.store.query(
            f"SELECT {select_list(InferenceEvent)} FROM inferences FINAL WHERE event_id IN {{ids:Array(String)}}",
            {"ids": ids}))
        by_id = {e.event_id: e for e in found}
        return [(by_id[a], by_id[b]) for a, b in pairs if a in by_id and b in by_id]  # type: ignore[misc]

    async def _grade_batch(self, grader: Grader, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        async with self._slots:
            return await grader.grade(batch)

    async def _run_grader(self, name: str, grader: Grader, window: tuple[int, int], report: GradingReport) -> None:
        cfg = self._config(name)
        budget = self._budgets.setdefault(name, _Budget(cfg.max_per_hour))
        left = budget.left(time.monotonic())
        limit = min(cfg.max_per_cycle, left)
        if limit <= 0:
            report.skipped_budget[name] = 1
            return
        todo = await self.ungraded(name, since_ms=window[0], until_ms=window[1], limit=limit)
        size = self.settings.batch_size
        results = await asyncio.gather(*(self._grade_batch(grader, todo[i:i + size])
                                         for i in range(0, len(todo), size)))
        await self._emit(name, [g for r in results for g in r], todo, report)
        budget.spend(time.monotonic(), len(todo))

    async def _run_pairs(self, window: tuple[int, int], report: GradingReport) -> None:
        assert self.pair_grader is not None
        cfg = self._config(PAIRWISE_GRADER_NAME)
        budget = self._budgets.setdefault(PAIRWISE_GRADER_NAME, _Budget(cfg.max_per_hour))
        limit = min(cfg.max_per_cycle, budget.left(time.monotonic()))
        if limit <= 0:
            report.skipped_budget[PAIRWISE_GRADER_NAME] = 1
            return
        pairs = await self.ungraded_pairs(since_ms=window[0], until_ms=window[1], limit=limit)
        async with self._slots:
            grades = await self.pair_grader.grade_pairs(pairs)
        await self._emit(PAIRWISE_GRADER_NAME, grades, [a for a, _ in pairs], report)
        budget.spend(time.monotonic(), len(pairs))

    async def _emit(self, name: str, grades: list[GradeEvent], seen: Sequence[InferenceEvent],
                    report: GradingReport) -> None:
        stamp = self.clock()  # the worker's clock dates its grades (graders stamp wall time)
        grades = [msgspec.structs.replace(g, ts_ms=stamp) for g in grades]
        if grades:
            await self.publish(grades)
        self._recent.setdefault(name, _Recent()).add([i.event_id for i in seen])
        if grades and self.exporters:
            by_id = {i.event_id: i for i in seen}
            for exporter in self.exporters:
                try:
                    await exporter.export(grades, by_id)
                except Exception:  # an exporter (Langfuse down, ...) never fails the cycle
                    log.exception("grade exporter %s failed", type(exporter).__name__)
        for g in grades:
            if g.inference_ts_ms:
                self.lag.labels(name).observe(max(0, g.ts_ms - g.inference_ts_ms) / 1000)
            self.graded_total.labels(name, g.label).inc()
        report.graded[name] = report.graded.get(name, 0) + len(grades)
        report.grades += grades
        if grades:
            report.lag_ms[name] = _lag_stats(grades)

    async def _jobs(self) -> dict[str, Callable[[tuple[int, int], GradingReport], Awaitable[None]]]:
        graders = await self.graders()
        jobs: dict[str, Callable[[tuple[int, int], GradingReport], Awaitable[None]]] = {
            name: functools.partial(self._run_grader, name, g) for name, g in graders.items()
            if self._config(name).enabled}
        if self.pair_grader is not None:
            jobs[PAIRWISE_GRADER_NAME] = self._run_pairs
        return jobs

    async def run_once(self, only: str | None = None) -> GradingReport:
        """One cycle of every grader (or of grader `only`) now, graders concurrently.

        Cycles of one grader never overlap. A failing grader is reported in `errors` and skipped.
        """
        started = time.perf_counter()
        now = self.clock()
        report = GradingReport(now_ms=now)
        window = (now - int(self.settings.lookback_s * 1000), now - int(self.settings.settle_s * 1000))
        jobs = {n: j for n, j in (await self._jobs()).items() if only is None or n == only}

        async def run(name: str, job: Callable[[tuple[int, int], GradingReport], Awaitable[None]]) -> None:
            async with self._locks.setdefault(name, asyncio.Lock()):
                await job(window, report)

        results = await asyncio.gather(*(run(n, j) for n, j in jobs.items()), return_exceptions=True)
        for name, result in zip(jobs, results, strict=True):
            if isinstance(result, Exception):
                log.error("grader %s failed: %s: %s", name, type(result).__name__, result)
                report.errors[name] = f"{type(result).__name__}: {result}"
        report.elapsed_s = time.perf_counter() - started
        self.last_report, self.cycles = report, self.cycles + 1
        return report

    async def start(self) -> None:
        """Run every grader on its own schedule (a cycle every `interval_s`, the first at once), so a slow
        grader never delays a fast one's grades."""
        self._stop.clear()
        names = list(await self._jobs())
        self._tasks = [asyncio.create_task(self._loop(n), name=f"grading-{n}") for n in names]

    async def _loop(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                report = await self.run_once(only=name)
                if name in report.errors:
                    self.errors[name] = report.errors[name]
                else:
                    self.errors.pop(name, None)
                log.debug("grading cycle: %s", report.summary())
            except Exception as e:
                self.errors[name] = f"{type(e).__name__}: {e}"
                log.exception("grading cycle of %s failed; next try in %.0f s", name, self.settings.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.interval_s)

    def health(self) -> dict[str, Any]:
        return {"cycles": self.cycles, "errors": dict(self.errors),
                "last": self.last_report.summary() if self.last_report else None}

    async def aclose(self, *, timeout_s: float = 10.0) -> None:
        """Stop after the running cycles (cancelled after `timeout_s`). Idempotent."""
        await stop_tasks(self._stop, self._tasks, timeout_s=timeout_s)
