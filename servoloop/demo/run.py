"""`servoloop demo`: start the whole system, play simulated users against it, let the loop close by itself, report.

    report = await run_demo(DemoPlan.quick(), settings, seed=7)      # a dict; report["verdict"], ["satisfaction"]

Phases (the demo only plays traffic and watches; every decision is the system's own):
1. `baseline`: trainers (tenant `demo`) ask, compare and rate; partway the prompt mix shifts (`drift`). The
   satisfaction monitor sees the tenant's thumbs-up rate under the service level and emits a RetrainTrigger.
2. `loop`: the retrain worker snapshots the dataset (the tenant's feedback up to the trigger), trains a DPO LoRA
   in a subprocess and gates it, a version scoped to the tenant. Meanwhile held-out users (same tenant, thumbs
   only, asking only now: outside the dataset's window) measure the base model. The retrain worker sends the
   gated candidate to canary (`retrain.auto_canary_share`); held-out traffic feeds both arms; the canary
   monitor promotes; every gateway hot-swaps.
3. `after`: held-out users on the promoted version.
4. `poisoned`: a group of users rates in reverse; the monitor triggers again; the gate rejects the candidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback.store import Store
from gateway.auth import KeyStore
from retrain.lineage import version_lineage
from retrain.worker import outcomes
from schemas.errors import FailedPrecondition, ServoloopError
from schemas.events import now_ms
from servoloop.demo.plan import HOLDOUT_TENANT, MODEL, TRAIN_TENANT, DemoPlan
from servoloop.demo.report import render_text, satisfaction_by_version, timeline
from servoloop.demo.simulator import TOPICS_AFTER, TOPICS_BEFORE, TrafficDriver, population, question_pool
from servoloop.settings import Settings
from servoloop.up import System, all_in_one


class DemoFailed(ServoloopError):
    """The demo could not run to its end (the system did not start, or a phase timed out)."""

    code = "demo_failed"


@dataclass
class DemoState:
    """What the live summary shows; updated by the phases and the watcher."""

    phase: str = "starting"
    started: float = field(default_factory=time.monotonic)
    triggers: int = 0
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # version id -> state
    active: str = "base"
    notes: list[str] = field(default_factory=list)


def _summary(state: DemoState, driver: TrafficDriver | None) -> Any:
    from rich.table import Table

    t = Table(title="servoloop demo", show_header=False, expand=False)
    t.add_row("phase", f"[bold]{state.phase}[/bold]  ({time.monotonic() - state.started:.0f} s)")
    if driver is not None:
        s = driver.stats
        t.add_row("requests", f"{s.total_requests}  (HTTP {s.requests['http']}, gRPC {s.requests['grpc']}, "
                              f"errors {s.errors})")
        t.add_row("feedback", ", ".join(f"{k} {v}" for k, v in sorted(s.feedback.items())) or "-")
        t.add_row("served", ", ".join(f"{k[:12]} {v}" for k, v in s.versions.most_common(4)) or "-")
    t.add_row("triggers", str(state.triggers))
    t.add_row("retrains", ", ".join(f"{o.get('outcome')} {str(o.get('version_id'))[:12]}" for o in state.outcomes) or "-")
    t.add_row("versions", ", ".join(f"{v[:12]} {s}" for v, s in state.versions.items()) or "-")
    t.add_row("active", state.active)
    for n in state.notes[-3:]:
        t.add_row("", n)
    return t


def _line(state: DemoState, driver: TrafficDriver) -> str:
    s = driver.stats
    return (f"[{time.monotonic() - state.started:5.0f}s] {state.phase} | requests {s.total_requests} "
            f"(errors {s.errors}) | feedback {sum(s.feedback.values())} | triggers {state.triggers} | retrains "
            f"{[o.get('outcome') for o in state.outcomes]} | active {state.active[:12]}")


async def _watch(system: System, store: Store, state: DemoState, plan: DemoPlan, stop: asyncio.Event) -> None:
    """Poll the store and the registry: the loop's progress (the demo only watches)."""
    registry = system.registry
    assert registry is not None
    while not stop.is_set():
        with contextlib.suppress(ServoloopError):
            t = await store.query("SELECT count() AS n FROM retrain_triggers FINAL WHERE model = {m:String}", {"m": MODEL})
            state.triggers = int(t.to_pylist()[0]["n"])
            state.outcomes = list(reversed(await outcomes(store)))
            versions = await registry.versions(MODEL)
            state.versions = {v.version_id: v.state for v in versions}
            # the registry lists the implicit `base` version as active too: an adapter version wins
            active = next((v for v in versions if v.state == "active" and v.version_id != "base"), None)
            state.active = active.version_id if active else "base"
            canary = next((v for v in versions if v.state == "canary"), None)
            note = f"canary: {canary.version_id[:12]} at {canary.canary_share:.0%}" if canary else ""
            if note and note not in state.notes:
                state.notes.append(note)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _until(cond: Callable[[], bool], deadline: float, what: str, state: DemoState) -> bool:
    while not cond():
        if time.monotonic() > deadline:
            state.notes.append(f"timed out waiting for {what}")
            return False
        await asyncio.sleep(0.5)
    return True


def _outcome_after(state: DemoState, n: int) -> dict[str, Any] | None:
    return state.outcomes[n] if len(state.outcomes) > n else None


async def run_demo(plan: DemoPlan, settings: Settings, *, seed: int = 7, store: Store | None = None,
                   engines: dict[str, Any] | None = None, report_path: Path | None = None, live: bool = True,
                   keep_running: bool = False, screenshot: Path | None = None, console: Any = None) -> dict[str, Any]:
    """Run the demo end to end and return its report (also written to `report_path` as JSON when given).

    `store`/`engines`: use these instead of opening the configured ones (tests share one chDB session).
    Raises DemoFailed when the system does not start; a phase that times out ends the demo with a report
    whose verdict says what did not happen.
    """
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True)
    t0_wall, t0_ms = time.monotonic(), now_ms()
    state = DemoState()
    system = all_in_one(settings, store=store, engines=engines)
    try:
        await system.start()
    except ServoloopError:
        await system.stop()
        raise
    except Exception as e:
        await system.stop()
        raise DemoFailed(f"the system did not start: {type(e).__name__}: {e}") from e
    assert system.server is not None and system.gateway is not None and system.pipeline is not None
    store = system.pipeline.store
    if store is None or system.registry is None:
        await system.stop()
        raise FailedPrecondition("the demo needs the store owner's components (events.broker.mode embedded or none)")

    server = system.server
    keystore = KeyStore(settings.keys_path)
    keys = {t: keystore.create(t, ["infer", "feedback"], name="demo")[1] for t in {TRAIN_TENANT, HOLDOUT_TENANT}}
    admin_key = keystore.create("ops", ["admin"], name="demo dashboard")[1]
    system.gateway.auth.reload()
    admin_key_file = settings.data_dir / "demo-admin-key.txt"
    admin_key_file.write_text(admin_key + "\n")
    http_url = f"http://{server.host}:{server.http_port}"
    dashboard = f"{http_url}/admin/"

    users = population(plan.trainers, plan.holdout, plan.poisoners, seed=seed)
    trainers = [u for u in users if u.group == "trainer"]
    holdout = [u for u in users if u.group == "holdout"]
    poisoners = [u for u in users if u.group == "poisoner"]
    before_q, after_q = question_pool(TOPICS_BEFORE), question_pool(TOPICS_AFTER)
    deadline = t0_wall + plan.timeout_s
    stop_watch = asyncio.Event()
    driver = TrafficDriver(http_url, f"{server.host}:{server.grpc_port}", keys, model=MODEL, seed=seed)
    watcher = asyncio.create_task(_watch(system, store, state, plan, stop_watch), name="demo-watch")
    live_ctx = Live(_summary(state, driver), console=console, refresh_per_second=2, transient=False) \
        if live and console.is_terminal else contextlib.nullcontext()
    refresher: asyncio.Task[None] | None = None
    promoted = poisoned = ""
    try:
        async with driver:
            with live_ctx as lv:
                async def refresh() -> None:
                    while True:
                        if lv is not None:
                            lv.update(_summary(state, driver))
                            await asyncio.sleep(0.5)
                        else:  # not a terminal (CI, a pipe): one plain line every 10 s
                            console.print(_line(state, driver), highlight=False)
                            await asyncio.sleep(10.0)
                if live:
                    refresher = asyncio.create_task(refresh())

                # 1. baseline, then drift, until the satisfaction monitor triggers a retrain
                state.phase = "baseline: users on the base model"
                triggered = asyncio.Event()

                async def trainer_traffic() -> None:
                    await driver.play(trainers, before_q, turns=plan.drift_after_turns, until=triggered)
                    state.phase = "drift: the prompt mix shifted (travel, tech)"
                    state.notes.append("prompt mix shifted")
                    await driver.play(trainers, after_q, until=triggered)

                async def wait_trigger() -> None:
                    await _until(lambda: state.triggers >= 1, deadline, "the first retrain trigger", state)
                    triggered.set()

                await asyncio.gather(trainer_traffic(), wait_trigger())
                # 2. the loop runs by itself. Held-out users measure the base model meanwhile (after the trigger,
                # so outside its dataset's window), then keep both canary arms busy.
                state.phase = "loop: dataset -> DPO LoRA -> gate; held-out users on the base model"
                await driver.play(holdout, before_q + after_q, turns=plan.holdout_turns_before)
                state.phase = "loop: dataset -> DPO LoRA -> gate -> canary -> promote"
                promoted_event = asyncio.Event()

                async def wait_promoted() -> None:
                    def done() -> bool:
                        o = _outcome_after(state, 0)
                        ended = any(s == "rolled_back" for s in state.versions.values())
                        return state.active != "base" or ended or (o is not None and o.get("outcome") != "registered")
                    await _until(done, deadline, "the promotion", state)
                    promoted_event.set()

                # no traffic while the candidate trains and is gated (it would only slow them down); then both arms
                await _until(lambda: "canary" in state.versions.values() or state.active != "base"
                             or any(o.get("outcome") != "registered" for o in state.outcomes), deadline,
                             "a canary", state)
                await asyncio.gather(wait_promoted(), driver.play(holdout, after_q, until=promoted_event))
                promoted = state.active if state.active != "base" else ""
                # 3. held-out users on the promoted version
                if promoted:
                    state.phase = f"after: held-out users on {promoted[:12]}"
                    await driver.play(holdout, before_q + after_q, turns=plan.holdout_turns_after)
                    # 4. poisoned feedback: a group rates in reverse until the monitor triggers again
                    state.phase = "poisoned: a group of users rates in reverse"
                    again = asyncio.Event()

                    async def wait_second() -> None:
                        await _until(lambda: state.triggers >= 2, deadline, "the poisoned trigger", state)
                        again.set()

                    await asyncio.gather(wait_second(), driver.play(poisoners, after_q, until=again))
                    state.phase = "poisoned: retraining on the poisoned window; the gate decides"
                    await _until(lambda: _outcome_after(state, 1) is not None, deadline, "the poisoned candidate's gate",
                                 state)
                    second = _outcome_after(state, 1)
                    poisoned = (second or {}).get("version_id", "")
                state.phase = "report"
                await asyncio.sleep(1.5)  # the last events through the pipeline
                report = await _report(plan, seed, store, system, state, driver, t0_ms, time.monotonic() - t0_wall,
                                       promoted, poisoned, dashboard, admin_key_file, report_path)
            if refresher is not None:
                refresher.cancel()
            if screenshot is not None:  # the dashboard of this run, for the README
                from servoloop.demo.screenshot import dashboard_screenshot

                try:
                    report["screenshot"] = str(await dashboard_screenshot(dashboard, admin_key, screenshot))
                except Exception as e:  # a missing browser does not spoil the demo's report
                    report["screenshot"] = f"failed: {type(e).__name__}: {e}"[:300]
            console.print(render_text(report))
            if keep_running:
                console.print(f"[green]the system keeps running[/green]: dashboard {dashboard} "
                              f"(admin key in {admin_key_file}); Ctrl-C to stop")
                with contextlib.suppress(asyncio.CancelledError):
                    await _wait_for_signal()
            return report
    finally:
        stop_watch.set()
        if refresher is not None:
            refresher.cancel()
        with contextlib.suppress(Exception):
            await watcher
        await system.stop()


async def _wait_for_signal() -> None:
    import signal

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()


def _compact_lineage(full: dict[str, Any]) -> dict[str, Any]:
    lin = full.get("lineage") or {}
    dataset = {k: v for k, v in (full.get("dataset") or {}).items() if k not in ("feedback_ids", "query")}
    ev = {k: v for k, v in (lin.get("eval") or {}).items() if isinstance(v, int | float | str | bool) or k == "reasons"}
    return {"version_id": full["version_id"], "state": full["state"], "base_model": full["base_model"],
            "adapter_path": full["adapter_path"], "artifact_sha256": full["artifact_sha256"],
            "parent_version": lin.get("parent_version"), "trigger_id": full.get("trigger_id"),
            "trigger_reason": lin.get("trigger_reason"), "recipe": lin.get("recipe"), "dataset": dataset,
            "eval": ev, "job": lin.get("job"), "feedback": {"count": (full.get("feedback") or {}).get("count")},
            "promoted_by": full.get("promoted_by") or next(
                (h["actor"] for h in reversed(full.get("history") or []) if h["state"] == "active"), None),
            "history": [{k: h[k] for k in ("ts_ms", "state", "actor", "reason")} for h in full.get("history") or []]}


async def _report(plan: DemoPlan, seed: int, store: Store, system: System, state: DemoState, driver: TrafficDriver,
                  t0_ms: int, wall_s: float, promoted: str, poisoned: str, dashboard: str, admin_key_file: Path,
                  report_path: Path | None) -> dict[str, Any]:
    sat = await satisfaction_by_version(store, HOLDOUT_TENANT, [u.user_id for u in population(
        plan.trainers, plan.holdout, plan.poisoners, seed=seed) if u.group == "holdout"])
    before = sat.get("base")
    after = sat.get(promoted) if promoted else None
    second = _outcome_after(state, 1) or {}
    lineage = _compact_lineage(await version_lineage(store, MODEL, promoted)) if promoted else {}
    reports = sorted(system.report_dir.glob("drift-*.html"), key=lambda p: p.stat().st_mtime) \
        if system.report_dir.exists() else []
    improvement = (after.rate - before.rate) * 100 if after and before and after.n and before.n else None
    ok = bool(promoted) and second.get("outcome") == "rejected"
    verdict = ("loop closed: trigger -> promoted; poisoned candidate rejected" if ok else
               "incomplete: " + "; ".join(state.notes[-3:] or ["see the timeline"]))
    s = driver.stats
    report = {
        "plan": plan.name, "seed": seed, "verdict": verdict, "ok": ok, "wall_s": round(wall_s, 1),
        "users": {"trainers": plan.trainers, "holdout": plan.holdout, "poisoners": plan.poisoners},
        "traffic": {"requests": s.total_requests, "http": s.requests["http"], "grpc": s.requests["grpc"],
                    "errors": s.errors, "last_error": s.last_error, "feedback": dict(s.feedback),
                    "feedback_total": sum(s.feedback.values()), "served_versions": dict(s.versions)},
        "satisfaction": {"tenant": HOLDOUT_TENANT, "by_version": {k: v.as_dict() for k, v in sat.items()},
                         "before": (before or _empty("base")).as_dict(),
                         "after": after.as_dict() if after else None,
                         "improvement_pp": round(improvement, 1) if improvement is not None else None},
        "promoted": promoted, "poisoned": poisoned, "poisoned_outcome": second.get("outcome"),
        "poisoned_reasons": second.get("reasons", []),
        "retrains": state.outcomes,
        "timeline": await timeline(store, MODEL, t0_ms),
        "lineage": lineage,
        "dashboard_url": dashboard, "admin_key_file": str(admin_key_file),
        "evidently_report": str(reports[-1]) if reports else None,
        "report_path": str(report_path) if report_path else None,
    }
    if report_path is not None:
        await asyncio.to_thread(_write_json, report_path, report)
    return report


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str))


def _empty(version: str) -> Any:
    from servoloop.demo.report import Satisfaction

    return Satisfaction(version, 0, 0)
