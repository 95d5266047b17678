"""One monitor cycle, and the scheduler that runs cycles: measure, decide, record, trigger, alert.

    report = await run_cycle(store, policy, now_ms=now, publish=store_publisher(store))

A cycle computes every quality metric once per distinct window (feedback/monitors/quality.py), runs
other monitor kinds (drift) through the `Monitor` seam, and for each policy entry and group applies
the significance test, the minimum sample size, hysteresis and the cooldown (evaluate.py, stats.py).
It emits exactly one MonitorResult per entry and group, and one RetrainTrigger per fire of a `retrain`
entry; the canary monitor (feedback/monitors/canary.py, the policy's `canary:` section) adds one result
per canary version and its promote/rollback requests (`ModelEvent`s); all go through `publish` (the event sink, so they reach Kafka like every event, or the store
directly); then it posts fire/resolve alerts to the webhook.

Alert state survives restarts without a state file: each MonitorResult carries its incident state in
`details` (`state`, `fired_at_ms`, `opened_at_ms`), and a cycle without in-memory state reads the latest
result per monitor and group (and the latest trigger) back from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from feedback.monitors.alerts import Alert, WebhookNotifier
from feedback.monitors.base import GroupKey, Monitor, MonitorWindow, group_of
from feedback.monitors.canary import run_canary
from feedback.monitors.evaluate import evaluate
from feedback.monitors.policy import MonitorPolicy, PolicyFile, PolicyReloader
from feedback.monitors.quality import Price, QualitySnapshot, estimate_of, quality_snapshot
from feedback.monitors.settings import MonitorSettings
from feedback.monitors.stats import AlertState, Level, corrected_alpha, step
from feedback.store.base import Store
from feedback.store.writer import write_events
from feedback.tasks import stop_tasks
from schemas.events import Event, ModelEvent, MonitorResult, RetrainTrigger, now_ms

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Event]], Awaitable[object]]
StateKey = tuple[str, GroupKey]
MonitorState = dict[StateKey, AlertState]
_STATUS_LEVEL: dict[str, Level] = {"alert": "breach", "warn": "elevated", "ok": "normal",
                                   "insufficient_data": "insufficient_data"}


def store_publisher(store: Store) -> Publish:
    """Publish by writing straight to the store (no event pipeline: `servoloop monitor run`, tests)."""
    return lambda events: write_events(store, events)


def sink_publisher(sink: Any) -> Publish:
    """Publish through an EventSink (`pipeline.sink`): results and triggers travel via Kafka like every event."""

    async def publish(events: Sequence[Event]) -> None:
        for e in events:
            sink.publish(e)

    return publish


@dataclass
class CycleReport:
    """What one cycle did. `state` is the alert state to pass to the next cycle."""

    now_ms: int
    results: list[MonitorResult] = field(default_factory=list)
    triggers: list[RetrainTrigger] = field(default_factory=list)
    model_requests: list[ModelEvent] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    alerts_delivered: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    state: MonitorState = field(default_factory=dict)
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        for r in self.results:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        return {"now_ms": self.now_ms, "results": len(self.results), "statuses": statuses,
                "triggers": len(self.triggers), "model_requests": len(self.model_requests), "alerts": len(self.alerts), "alerts_delivered": self.alerts_delivered,
                "errors": self.errors, "elapsed_s": round(self.elapsed_s, 3)}


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _status(level: Level, state: AlertState) -> str:
    if level == "insufficient_data":
        return "insufficient_data"
    if state.firing:
        return "alert"
    return "warn" if level in ("elevated", "breach") else "ok"


async def load_state(store: Store, monitors: Sequence[str], *, now_ms: int, lookback_ms: int) -> MonitorState:
    """The alert state per monitor and group as the store last recorded it (results and triggers)."""
    if not monitors:
        return {}
    params: dict[str, Any] = {"names": list(monitors), "since": now_ms - lookback_ms, "until": now_ms}
    window = ("ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC') "
              "AND ts <= fromUnixTimestamp64Milli({until:Int64}, 'UTC')")
    rows = (await store.query(f"""
        SELECT monitor, tenant, model, model_version, JSONExtractString(details, 'canary_arm') AS canary_arm,
               argMax(details, (ts, event_id)) AS last_details
        FROM monitor_results FINAL
        WHERE monitor IN {{names:Array(String)}} AND {window}
        GROUP BY monitor, tenant, model, model_version, canary_arm""", params)).to_pylist()
    triggers = (await store.query(f"""
        SELECT JSONExtractString(params, 'monitor') AS monitor, tenant, model, model_version,
               JSONExtractString(params, 'canary_arm') AS canary_arm, toUnixTimestamp64Milli(max(ts)) AS fired_at_ms
        FROM retrain_triggers FINAL
        WHERE JSONExtractString(params, 'monitor') IN {{names:Array(String)}} AND {window}
        GROUP BY monitor, tenant, model, model_version, canary_arm""", params)).to_pylist()
    state: MonitorState = {}
    for row in rows:
        try:
            d = msgspec.json.decode(row["last_details"])
        except msgspec.DecodeError:
            continue
        key = (row["monitor"], GroupKey(row["tenant"], row["model"], row["model_version"], row["canary_arm"]))
        state[key] = AlertState(firing=d.get("state") == "firing", fired_at_ms=d.get("fired_at_ms"),
                                opened_at_ms=d.get("opened_at_ms"))
    for row in triggers:
        key = (row["monitor"], GroupKey(row["tenant"], row["model"], row["model_version"], row["canary_arm"]))
        s = state.get(key, AlertState())
        fired = max(s.fired_at_ms or 0, int(row["fired_at_ms"]))
        state[key] = msgspec.structs.replace(s, fired_at_ms=fired)
    return state


class _DriftAdapter:
    """feedback.monitors.drift's DriftDetector as the `drift` Monitor: DriftSettings from the entry's `params`,
    one prompt embedder kept across runs (loading it costs seconds)."""

    kind = "drift"

    def __init__(self, module: Any, report_dir: Path | None, embedder: Any = None):
        self._module, self.report_dir = module, report_dir
        self._embedder = embedder

    async def run(self, store: Store, window: MonitorWindow, policy: MonitorPolicy) -> list[MonitorResult]:
        settings = self._module.DriftSettings(**{"min_samples": policy.min_samples, **policy.params})
        if self._embedder is None and settings.embeddings and settings.embed_missing:
            from feedback.monitors.embeddings import PromptEmbedder

            self._embedder = PromptEmbedder()
        detector = self._module.DriftDetector(settings, report_dir=self.report_dir, embedder=self._embedder)
        return list(await detector.run(store, window, policy))


def default_monitors(report_dir: Path | None = None, *, embedder: Any = None) -> dict[str, Monitor]:
    """Monitors of kinds other than `quality`: `grade` (grades as metrics, feedback/monitors/grades.py), and
    `drift` when feedback.monitors.drift is installed.

    `report_dir` receives the drift HTML reports; `embedder` is a loaded PromptEmbedder to reuse.
    """
    from feedback.monitors.grades import GradeMonitor

    found: dict[str, Monitor] = {"grade": GradeMonitor()}
    try:
        module = importlib.import_module("feedback.monitors.drift")
    except ModuleNotFoundError as e:
        if e.name == "feedback.monitors.drift":
            return found
        raise
    if hasattr(module, "DriftDetector") and hasattr(module, "DriftSettings"):
        found["drift"] = _DriftAdapter(module, report_dir, embedder)
    return found


@dataclass
class _Outcome:
    group: GroupKey
    level: Level
    value: float | None
    baseline: float | None
    p_value: float | None
    n: int
    n_baseline: int | None
    details: dict[str, Any]
    source: MonitorResult | None = None


class _Cycle:
    def __init__(self, policy: PolicyFile, now_ms: int, state: MonitorState, interval_ms: int | None):
        self.policy, self.now_ms, self.state, self.interval_ms = policy, now_ms, state, interval_ms
        self.report = CycleReport(now_ms=now_ms)

    def looks(self, entry: MonitorPolicy) -> int:
        if entry.correction == "none" or not self.interval_ms:
            return 1
        return max(1, math.ceil(entry.window.current / self.interval_ms))

    def quality_outcomes(self, entry: MonitorPolicy, snap: QualitySnapshot) -> list[_Outcome]:
        groups = {g for g in snap.current if entry.applies_to(g.tenant, g.model)}
        groups |= {g for (name, g), s in self.state.items() if name == entry.name and s.firing}
        pairs = [(g, estimate_of(snap.current.get(g), entry.metric),
                  estimate_of(snap.baseline.get(g), entry.metric)) for g in sorted(groups)]
        tests = sum(1 for _, c, b in pairs
                    if c.n >= entry.min_samples and (entry.compare == "threshold" or b.n >= entry.min_samples))
        alpha = entry.alpha if entry.correction == "none" else corrected_alpha(entry.alpha, looks=self.looks(entry),
                                                                              tests=tests)
        out = []
        for g, cur, base in pairs:
            ev = evaluate(entry, cur, base if entry.compare == "baseline" else None, alpha=alpha)
            details = {
                "kind": cur.kind, "compare": entry.compare, "worse": entry.worse, "relative": entry.relative,
                "clear": entry.clear, "baseline": _finite(ev.baseline), "baseline_sample_size": ev.n_baseline,
                "ci_low": _finite(ev.ci.low), "ci_high": _finite(ev.ci.high),
                "baseline_ci_low": _finite(ev.baseline_ci.low) if ev.baseline_ci else None,
                "baseline_ci_high": _finite(ev.baseline_ci.high) if ev.baseline_ci else None,
                "confidence": entry.confidence, "deterioration": _finite(ev.deterioration),
                "p_value": _finite(ev.p_value), "alpha": entry.alpha, "alpha_corrected": alpha,
                "significant": ev.significant, "decision": ev.decision.level, "reason": ev.decision.reason,
                "baseline_window": [snap.window.baseline.start_ms, snap.window.baseline.end_ms],
            }
            out.append(_Outcome(g, ev.decision.level, _finite(ev.value), _finite(ev.baseline), _finite(ev.p_value),
                                ev.n, ev.n_baseline, details))
        return out

    def outcomes_of(self, entry: MonitorPolicy, results: Sequence[MonitorResult]) -> list[_Outcome]:
        out = []
        for r in results:
            try:
                details = msgspec.json.decode(r.details or "{}")
            except msgspec.DecodeError:
                details = {}
            if not isinstance(details, dict):
                details = {}
            g = group_of(r)
            if not entry.applies_to(g.tenant, g.model):
                continue
            base = details.get("baseline")
            out.append(_Outcome(g, _STATUS_LEVEL.get(r.status, "insufficient_data"), _finite(r.value),
                                base if isinstance(base, int | float) else None,
                                details.get("p_value") if isinstance(details.get("p_value"), int | float) else None,
                                r.sample_size, details.get("baseline_sample_size"), details, r))
        return out

    def apply(self, entry: MonitorPolicy, window: MonitorWindow, outcomes: Sequence[_Outcome]) -> None:
        for o in outcomes:
            key = (entry.name, o.group)
            t = step(self.state.get(key, AlertState()), o.level, now_ms=self.now_ms, cooldown_ms=entry.cooldown)
            self.state[key] = t.state
            details = {**o.details, "canary_arm": o.group.canary_arm, "monitor_kind": entry.kind,
                       "state": "firing" if t.state.firing else "clear", "fired_at_ms": t.state.fired_at_ms,
                       "opened_at_ms": t.state.opened_at_ms, "fired": t.fire, "resolved": t.resolve,
                       "suppressed": "cooldown" if t.suppressed else None, "action": entry.action.type}
            fields: dict[str, Any] = {
                "ts_ms": self.now_ms, "tenant": o.group.tenant, "monitor": entry.name, "metric": entry.metric,
                "model": o.group.model, "model_version": o.group.model_version,
                "window_start_ms": window.current.start_ms, "window_end_ms": window.current.end_ms,
                "value": o.value if o.value is not None else 0.0, "threshold": entry.threshold,
                "status": _status(o.level, t.state), "sample_size": min(o.n, 2**32 - 1),
                "details": msgspec.json.encode(details).decode()}
            if o.source is not None:
                fields["threshold"] = o.source.threshold
                result = msgspec.structs.replace(o.source, **fields)
            else:
                result = MonitorResult(**fields)
            self.report.results.append(result)
            trigger = None
            if t.fire and entry.action.type == "retrain":
                trigger = self._trigger(entry, window, o, result)
                self.report.triggers.append(trigger)
            if (t.fire or t.resolve) and entry.action.notify:
                self.report.alerts.append(Alert(
                    event="fired" if t.fire else "resolved", monitor=entry.name, metric=entry.metric,
                    action=entry.action.type, tenant=o.group.tenant, model=o.group.model,
                    model_version=o.group.model_version, canary_arm=o.group.canary_arm, value=o.value,
                    baseline=o.baseline, threshold=entry.threshold, p_value=o.p_value, sample_size=o.n,
                    window_start_ms=window.current.start_ms, window_end_ms=window.current.end_ms,
                    ts_ms=self.now_ms, reason=str(o.details.get("reason", "")), monitor_event_id=result.event_id,
                    trigger_event_id=trigger.event_id if trigger else ""))

    def _trigger(self, entry: MonitorPolicy, window: MonitorWindow, o: _Outcome, result: MonitorResult) -> RetrainTrigger:
        evidence = {
            "monitor": entry.name, "metric": entry.metric, "tenant": o.group.tenant, "canary_arm": o.group.canary_arm,
            "compare": entry.compare, "worse": entry.worse, "relative": entry.relative,
            "current": o.value, "baseline": o.baseline, "deterioration": o.details.get("deterioration"),
            "threshold": entry.threshold, "p_value": o.p_value, "alpha": entry.alpha,
            "alpha_corrected": o.details.get("alpha_corrected"), "sample_size": o.n,
            "baseline_sample_size": o.n_baseline,
            "window": [window.current.start_ms, window.current.end_ms],
            "baseline_window": [window.baseline.start_ms, window.baseline.end_ms],
            "recipe": entry.action.recipe, "data_window_ms": entry.action.data_window,
        }
        base = "n/a" if o.baseline is None else f"{o.baseline:.4g}"
        cur = "n/a" if o.value is None else f"{o.value:.4g}"
        p = "" if o.p_value is None else f", p={o.p_value:.2g}"
        return RetrainTrigger(
            ts_ms=self.now_ms, tenant=o.group.tenant, model=o.group.model, model_version=o.group.model_version,
            method=entry.action.recipe, reason=f"{entry.name}: {entry.metric} {base} -> {cur}{p} (n={o.n})",
            monitor_event_id=result.event_id, window_start_ms=max(0, self.now_ms - entry.action.data_window),
            window_end_ms=self.now_ms, actor=f"monitor:{entry.name}",
            params=msgspec.json.encode(evidence).decode())


async def run_cycle(store: Store, policy: PolicyFile, *, now_ms: int, publish: Publish,
                    state: MonitorState | None = None, notifier: WebhookNotifier | None = None,
                    prices: Mapping[str, Price] | None = None, interval_ms: int | None = None,
                    monitors: Mapping[str, Monitor] | None = None) -> CycleReport:
    """Evaluate every enabled policy entry at `now_ms`, publish results and triggers, then send alerts.

    `state` is the previous cycle's `report.state`; None reads it back from the store. `interval_ms` (the
    scheduler's cadence) sets the number of looks for the Bonferroni correction. `monitors` maps a policy
    `kind` to its Monitor (default: `drift` from feedback.monitors.drift when present). A failing monitor
    is reported in `errors` and skipped; a failing `publish` raises (the state is then not advanced).
    """
    started = time.perf_counter()
    entries = policy.active
    if state is None:
        lookback = max((e.cooldown + e.window.current for e in entries), default=0) + 86_400_000
        state = await load_state(store, [e.name for e in entries], now_ms=now_ms, lookback_ms=lookback)
    cycle = _Cycle(policy, now_ms, dict(state), interval_ms)
    if monitors is None:
        monitors = default_monitors()
    snapshots: dict[tuple[Any, float], QualitySnapshot] = {}
    # Entries of one kind with equal windows and params share one run (e.g. dataset and embedding drift).
    runs: dict[tuple[str, MonitorWindow, str], list[MonitorResult]] = {}
    for entry in entries:
        window = entry.window.at(now_ms)
        try:
            if entry.kind == "quality":
                key = (window, entry.confidence)
                if key not in snapshots:
                    snapshots[key] = await quality_snapshot(store, window, prices=prices, confidence=entry.confidence)
                outcomes = cycle.quality_outcomes(entry, snapshots[key])
            elif entry.kind in monitors:
                key2 = (entry.kind, window, json.dumps(entry.params, sort_keys=True, default=str))
                if key2 not in runs:
                    runs[key2] = await monitors[entry.kind].run(store, window, entry)
                outcomes = cycle.outcomes_of(entry, [r for r in runs[key2] if r.metric == entry.metric])
            else:
                cycle.report.errors[entry.name] = f"no monitor for kind {entry.kind!r}"
                continue
        except Exception as e:  # one broken monitor must not silence the others
            log.exception("monitor %s failed", entry.name)
            cycle.report.errors[entry.name] = f"{type(e).__name__}: {e}"
            continue
        cycle.apply(entry, window, outcomes)
    report = cycle.report
    if policy.canary.enabled:
        try:
            canary = await run_canary(store, policy.canary, now_ms=now_ms, state=cycle.state)
            report.results += canary.results
            report.model_requests += canary.requests
            report.alerts += canary.alerts
            report.errors.update(canary.errors)
        except Exception as e:  # the canary monitor failing must not silence the others
            log.exception("canary monitor failed")
            report.errors["canary"] = f"{type(e).__name__}: {e}"
    if report.results or report.triggers or report.model_requests:
        await publish([*report.results, *report.triggers, *report.model_requests])
    report.state = cycle.state
    if notifier is not None and report.alerts:
        report.alerts_delivered = await notifier.send_all(report.alerts)
    report.elapsed_s = time.perf_counter() - started
    return report


class Scheduler:
    """Runs a cycle every `settings.interval_s` (first one at start), with the policy file hot-reloaded.

        scheduler = Scheduler(store, settings.monitors, sink_publisher(pipeline.sink))
        await scheduler.start()      # raises ConfigError for a bad policy file
        ...
        await scheduler.aclose()

    The alert state is kept between cycles in memory (results published through Kafka may reach the
    store after the next cycle starts) and read from the store at start.
    """

    def __init__(self, store: Store, settings: MonitorSettings, publish: Publish, *,
                 clock: Callable[[], int] = now_ms, monitors: Mapping[str, Monitor] | None = None,
                 report_dir: Path | None = None):
        self.store, self.settings, self.publish = store, settings, publish
        self.clock = clock
        self.monitors = monitors if monitors is not None else default_monitors(report_dir or settings.report_dir)
        self.reloader: PolicyReloader | None = None
        self.notifier: WebhookNotifier | None = None
        self.last_report: CycleReport | None = None
        self.last_error: str | None = None
        self.cycles = 0
        self._state: MonitorState | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._prices = {m: Price(p.input_per_1k, p.output_per_1k) for m, p in settings.prices.items()}

    async def start(self) -> None:
        self.reloader = await asyncio.to_thread(PolicyReloader, self.settings.policy_path,
                                                interval_s=self.settings.reload_interval_s)
        if self.settings.webhook.url:
            self.notifier = WebhookNotifier(self.settings.webhook)
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._loop(), name="monitor-scheduler"),
                       asyncio.create_task(self.reloader.run(self._stop), name="monitor-policy-reload")]

    async def run_once(self) -> CycleReport:
        """One cycle now (cycles never overlap). Raises what the store or `publish` raise."""
        if self.reloader is None:
            raise RuntimeError("Scheduler.start() first")
        async with self._lock:
            report = await run_cycle(self.store, self.reloader.current, now_ms=self.clock(), publish=self.publish,
                                     state=self._state, notifier=self.notifier, prices=self._prices,
                                     interval_ms=int(self.settings.interval_s * 1000), monitors=self.monitors)
            self._state = report.state
            self.last_report, self.last_error = report, None
            self.cycles += 1
            return report

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                report = await self.run_once()
                log.info("monitor cycle: %s", report.summary())
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("monitor cycle failed; next try in %.0f s", self.settings.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.interval_s)

    def health(self) -> dict[str, Any]:
        return {"cycles": self.cycles, "last_error": self.last_error,
                "policy_error": self.reloader.last_error.message if self.reloader and self.reloader.last_error else None,
                "last": self.last_report.summary() if self.last_report else None}

    async def aclose(self, *, timeout_s: float = 10.0) -> None:
        """Stop: let a running cycle finish (up to `timeout_s`, then cancel it). Idempotent."""
        await stop_tasks(self._stop, self._tasks, timeout_s=timeout_s)
        if self.notifier is not None:
            await self.notifier.aclose()
            self.notifier = None
