"""The retrain worker: a `RetrainTrigger` becomes a dataset snapshot, a training subprocess, a gate verdict and a
registered candidate (rejected with reasons when the gate fails).

    worker = RetrainWorker(store, registry, settings)   # settings: the whole tree (or its `retrain` section)
    await worker.run(stop_event)                         # polls `retrain_triggers`, one job at a time
    outcome = await worker.handle(trigger)               # one trigger now (the CLI's `servoloop retrain run`)

Training runs as `python -m servoloop.cli train …` in its own process: a crash, an out-of-memory or a hang
(killed after the recipe's timeout plus a grace) never takes the serving process down. Each handled trigger
gets one outcome row in `monitor_results` (monitor `retrain_worker`, details: trigger id, outcome, version,
reasons, paths), which is also how the worker knows a trigger is handled: a restart re-runs only triggers
without one.

Tenants: a trigger naming a tenant trains on that tenant's feedback only and registers a version scoped to
it (lineage `tenant`), evaluated against the tenant's active version, else the global one. A tenant with
fewer than `tenant_min_feedback` feedback events in the window gets no adapter of its own: the trigger is
`declined` with that reason (its feedback still counts toward the global model unless the tenant is one of
`private_tenants`, whose feedback no global dataset reads).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from feedback.store import Store, write_events
from feedback.store.columns import from_arrow
from retrain.datasets import DatasetFilters, DatasetSnapshot, EmptyDataset, build_snapshot
from retrain.lifecycle import Registry
from retrain.recipes import Recipe, load_recipe
from retrain.settings import RetrainSettings
from schemas.errors import FailedPrecondition, NotFound, ServoloopError
from schemas.events import MonitorResult, RetrainTrigger, now_ms

log = logging.getLogger(__name__)

MONITOR = "retrain_worker"
METRIC = "retrain_outcome"
REPO_ROOT = Path(__file__).resolve().parent.parent


class TrainingFailed(ServoloopError):
    """The training subprocess exited with an error or was killed at its timeout."""

    code = "training_failed"


@dataclass(frozen=True, slots=True)
class RetrainOutcome:
    """What became of one trigger: `registered` (gate passed), `rejected` (gate failed), `skipped`, `declined`
    (a tenant below the minimum feedback for an adapter of its own), `failed`."""

    trigger_id: str
    model: str
    outcome: str
    version_id: str = ""
    reasons: tuple[str, ...] = ()
    dataset: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    job_dir: str = ""
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}


_UNHANDLED_SQL = """
SELECT * FROM retrain_triggers FINAL
WHERE event_id NOT IN (
    SELECT JSONExtractString(details, 'trigger_id') FROM monitor_results
    WHERE monitor = {monitor:String})
ORDER BY ts, event_id
LIMIT {limit:UInt64}"""


async def unhandled_triggers(store: Store, limit: int = 10) -> list[RetrainTrigger]:
    """Triggers without an outcome row, oldest first."""
    table = await store.query(_UNHANDLED_SQL, {"monitor": MONITOR, "limit": limit})
    return from_arrow(RetrainTrigger, table)  # type: ignore[return-value]


async def get_trigger(store: Store, trigger_id: str) -> RetrainTrigger:
    """The trigger `trigger_id`; raises NotFound."""
    table = await store.query("SELECT * FROM retrain_triggers FINAL WHERE event_id = {id:String} LIMIT 1",
                              {"id": trigger_id})
    found = from_arrow(RetrainTrigger, table)
    if not found:
        raise NotFound(f"no retrain trigger {trigger_id!r}", param="trigger_id")
    return found[0]  # type: ignore[return-value]


async def tenant_feedback_count(store: Store, tenant: str, start_ms: int, end_ms: int) -> int:
    """Feedback events of `tenant` in `[start_ms, end_ms)` (each idempotency key once)."""
    table = await store.query(
        "SELECT count() AS n FROM (SELECT 1 FROM feedback FINAL WHERE tenant = {tenant:String} "
        "AND ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') "
        "AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC') "
        "LIMIT 1 BY if(idempotency_key = '', event_id, idempotency_key))",
        {"tenant": tenant, "start_ms": start_ms, "end_ms": end_ms})
    return int(table.column("n").to_pylist()[0])


async def outcomes(store: Store, *, trigger_id: str | None = None) -> list[dict[str, Any]]:
    """Recorded outcomes (details parsed), newest first."""
    where = " AND JSONExtractString(details, 'trigger_id') = {tid:String}" if trigger_id else ""
    table = await store.query(
        "SELECT details FROM monitor_results FINAL WHERE monitor = {monitor:String}" + where + " ORDER BY ts DESC",
        {"monitor": MONITOR, **({"tid": trigger_id} if trigger_id else {})})
    return [json.loads(d) for d in table.column("details").to_pylist()]


class RetrainWorker:
    """Turns retrain triggers into gated candidates in the registry, one job at a time (see the module docstring).

    `settings`: the settings tree (its `retrain`, `data_dir` and gateway model paths are used) or a bare
    `RetrainSettings` with `data_dir`. `python`: the interpreter that runs training jobs.
    """

    def __init__(self, store: Store, registry: Registry, settings: Any, *, data_dir: Path | None = None,
                 python: str = sys.executable, actor: str = "retrain-worker") -> None:
        self.store = store
        self.registry = registry
        self.settings: RetrainSettings = settings if isinstance(settings, RetrainSettings) else settings.retrain
        root = data_dir or getattr(settings, "data_dir", None) or Path(".servoloop")
        self.work_dir = Path(self.settings.work_dir or Path(root) / "retrain").resolve()
        self.base_models: dict[str, str] = {}
        for m in getattr(getattr(settings, "gateway", None), "models", None) or ():
            if getattr(m, "path", ""):
                self.base_models[m.name] = m.path
        self.base_models |= self.settings.base_models
        self.python = python
        self.actor = actor
        self._one_job = asyncio.Lock()

    # -- the loop ----------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll for unhandled triggers and handle them one by one until `stop` is set. Never raises on a job."""
        log.info("retrain worker polling every %.1fs (work dir %s)", self.settings.poll_interval_s, self.work_dir)
        while not stop.is_set():
            try:
                pending = await unhandled_triggers(self.store, limit=1)
            except ServoloopError as e:
                log.warning("retrain worker cannot read triggers: %s", e)
                pending = []
            for trigger in pending:
                if stop.is_set():
                    break
                await self.handle(trigger)
            if not pending:
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
                except TimeoutError:
                    pass

    async def handle(self, trigger: RetrainTrigger) -> RetrainOutcome:
        """Run one trigger end to end and record its outcome. Errors become a `failed` outcome, never raised."""
        async with self._one_job:
            t0 = time.monotonic()
            try:
                outcome = await self._handle(trigger)
            except Exception as e:  # a job's failure is its outcome; the worker (and the server) carry on
                log.exception("retrain for trigger %s failed", trigger.event_id)
                outcome = RetrainOutcome(trigger.event_id, trigger.model, "failed",
                                         reasons=(f"{type(e).__name__}: {getattr(e, 'message', str(e))}",))
            outcome = RetrainOutcome(**{**asdict(outcome), "wall_s": round(time.monotonic() - t0, 2)})
            await self._record(trigger, outcome)
            log.info("retrain %s for %s: %s %s %s", trigger.event_id, trigger.model, outcome.outcome,
                     outcome.version_id, "; ".join(outcome.reasons))
            return outcome

    # -- one job -----------------------------------------------------------------------------------------------

    def recipe_for(self, trigger: RetrainTrigger) -> Recipe:
        params = _params(trigger)
        named = params.get("recipe")  # a monitor names the method's recipe ("dpo"): the settings map it to a file
        name = (self.settings.recipes.get(named, named) if named else None) \
            or self.settings.recipes.get(trigger.method) or trigger.method
        overrides = {k: params[k] for k in ("epochs", "learning_rate", "batch_size", "save_steps", "timeout_s")
                     if k in params}
        return load_recipe(name, **overrides)

    def filters_for(self, trigger: RetrainTrigger) -> DatasetFilters:
        params = _params(trigger)
        end = trigger.window_end_ms or trigger.ts_ms or now_ms()
        start = trigger.window_start_ms or max(0, end - int(self.settings.default_window_s * 1000))
        tenant = params.get("tenant") or trigger.tenant or None
        private = () if tenant else tuple(self.settings.private_tenants)  # a global dataset skips private tenants
        return DatasetFilters(
            start_ms=start, end_ms=end, tenant=tenant, exclude_tenants=private,
            model=trigger.model or None, model_version=params.get("model_version"),
            eval_fraction=float(params.get("eval_fraction", self.settings.eval_fraction)),
            min_agreement=float(params.get("min_agreement", self.settings.min_agreement)),
            use_embeddings=self.settings.use_embeddings)

    def base_dir(self, model: str, base_model: str) -> Path:
        for key in (model, base_model):
            if key in self.base_models:
                return Path(self.base_models[key])
        if base_model and (Path(base_model) / "config.json").exists():
            return Path(base_model)
        raise FailedPrecondition(f"no base model directory for model {model!r} (settings retrain.base_models)",
                                 param="model")

    async def _handle(self, trigger: RetrainTrigger) -> RetrainOutcome:
        recipe = self.recipe_for(trigger)
        filters = self.filters_for(trigger)
        job_dir = self.work_dir / "jobs" / trigger.event_id
        tenant = filters.tenant or ""
        if tenant and self.settings.tenant_min_feedback:
            n = await tenant_feedback_count(self.store, tenant, filters.start_ms, filters.end_ms)
            if n < self.settings.tenant_min_feedback:
                pooled = ("its feedback counts toward the global model" if tenant not in self.settings.private_tenants
                          else "its policy keeps its feedback out of the global model")
                return RetrainOutcome(trigger.event_id, trigger.model, "declined", reasons=(
                    f"tenant {tenant!r} has {n} feedback events in the window; an adapter of its own needs "
                    f"tenant_min_feedback {self.settings.tenant_min_feedback} ({pooled})",),
                    dataset={"tenant": tenant, "feedback": n, "window_start_ms": filters.start_ms,
                             "window_end_ms": filters.end_ms})
        try:
            snapshot = await build_snapshot(self.store, filters, self.work_dir / "datasets")
        except EmptyDataset as e:
            return RetrainOutcome(trigger.event_id, trigger.model, "skipped", reasons=(e.message,))
        records = snapshot.manifest["counts"]["train" if recipe.method == "dpo" else "sft_train"]
        dataset = {"sha256": snapshot.sha256, "path": str(snapshot.path), "window_start_ms": filters.start_ms,
                   "window_end_ms": filters.end_ms, "feedback_ids": snapshot.manifest["feedback_ids"],
                   "query": snapshot.manifest["queries"], "tenant": filters.tenant or "",
                   "counts": snapshot.manifest["counts"]}
        if records < self.settings.min_pairs:
            return RetrainOutcome(trigger.event_id, trigger.model, "skipped", dataset=_brief(dataset),
                                  reasons=(f"{records} {recipe.method} training records < min_pairs "
                                           f"{self.settings.min_pairs}",))

        parent = (await self.registry.active(trigger.model, tenant) if tenant else None) \
            or await self.registry.active(trigger.model)
        base_model = (parent.base_model if parent else "") or trigger.model
        base_dir = self.base_dir(trigger.model, base_model).resolve()
        current_dir = await self._current_adapter(parent)
        summary = await self.train_subprocess(recipe, snapshot, base_dir, job_dir)
        await asyncio.to_thread(clean_job, job_dir)  # the adapter is written: its checkpoints are no longer needed

        from retrain.gate import evaluate

        result = await asyncio.to_thread(
            evaluate, base_dir=base_dir, candidate_dir=job_dir / "adapter", eval_pairs=snapshot.pairs("eval"),
            thresholds=recipe.gate, beta=recipe.beta, current_dir=current_dir, max_length=recipe.max_length,
            seed=recipe.seed, prompts=[e["prompt"] for e in snapshot.sft("eval")])
        lineage = {
            "base_model": base_model, "parent_version": parent.version_id if parent else "base",
            "recipe": {"name": recipe.name, "method": recipe.method, "lora": recipe.lora.model_dump(mode="json")},
            "hyperparameters": recipe.hyperparameters(), "dataset": dataset, "tenant": tenant,
            "trigger_id": trigger.event_id,
            "trigger_reason": trigger.reason, "eval": result.as_dict(),
            "job": {"dir": str(job_dir), "wall_s": summary.get("wall_s"), "global_step": summary.get("global_step"),
                    "final_loss": summary.get("final_loss"), "host": os.uname().nodename},
        }
        version = await self.registry.register_candidate(model=trigger.model, base_model=base_model,
                                                         adapter_dir=job_dir / "adapter", lineage=lineage,
                                                         actor=self.actor, tenant=tenant)
        if not result.passed:
            await self.registry.reject(trigger.model, version.version_id, reasons=list(result.reasons),
                                       actor="eval-gate", evidence=result.as_dict())
        elif self.settings.auto_canary_share > 0:
            await self._start_canary(trigger.model, version.version_id)
        return RetrainOutcome(trigger.event_id, trigger.model, "registered" if result.passed else "rejected",
                              version.version_id, result.reasons, _brief(dataset), _brief_eval(result.as_dict()),
                              str(job_dir))

    async def _start_canary(self, model: str, version_id: str) -> None:
        """`auto_canary_share`: the gated candidate goes to canary now. If the registry refuses (another canary
        is live in its scope), it stays a candidate for an operator, and the refusal is logged."""
        share = self.settings.auto_canary_share
        try:
            await self.registry.start_canary(model, version_id, share=share, actor=self.actor,
                                             reason=f"passed the gate: canary at {share:.0%} (retrain.auto_canary_share)")
        except ServoloopError as e:
            log.warning("retrain: %s stays a candidate: %s", version_id, e)

    async def _current_adapter(self, parent: Any) -> Path | None:
        if parent is None or not parent.adapter_path:
            return None
        from schemas.artifacts import fetch_verified, is_local

        if parent.artifact_sha256:  # verified against the registry's hash before it is evaluated against
            return await asyncio.to_thread(fetch_verified, parent.adapter_path, parent.artifact_sha256,
                                           self.work_dir / "cache")
        if is_local(parent.adapter_path):
            return Path(parent.adapter_path.removeprefix("file://"))
        raise FailedPrecondition(f"active version {parent.version_id} has a remote adapter without a hash")

    async def train_subprocess(self, recipe: Recipe, snapshot: DatasetSnapshot, base_dir: Path, job_dir: Path,
                               *, resume: bool = True) -> dict[str, Any]:
        """Run `servoloop train` as a child process (own process group), killed after timeout + grace.

        Resumes a previous attempt's checkpoint in `job_dir`. Raises TrainingFailed with the log's tail.
        """
        await asyncio.to_thread(_write_recipe, recipe, job_dir)
        cmd = [self.python, "-m", "servoloop.cli", "train", "--recipe", str(job_dir / "recipe.yaml"),
               "--dataset", str(snapshot.path), "--base", str(base_dir), "--out", str(job_dir),
               "--no-progress", *(["--resume"] if resume else [])]
        out_log = job_dir / "train.out"
        limit = recipe.timeout_s + self.settings.train_grace_s
        log.info("training job %s: %s", job_dir.name, " ".join(cmd))
        with out_log.open("ab") as sink:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=sink, stderr=asyncio.subprocess.STDOUT,
                                                        cwd=str(REPO_ROOT), start_new_session=True, env=job_env())
            try:
                rc = await asyncio.wait_for(proc.wait(), limit)
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                raise TrainingFailed(f"training job killed after {limit:g}s", details={"log": _tail(out_log)}) from None
            except asyncio.CancelledError:  # the worker is shutting down: no outcome, the next run resumes the job
                _kill_group(proc.pid)
                await asyncio.shield(proc.wait())
                raise
        if rc != 0:
            raise TrainingFailed(f"training job exited with status {rc}: {_tail(out_log, 600)}",
                                 details={"log": _tail(out_log)})
        summary_path = job_dir / "adapter" / "training_summary.json"
        if not summary_path.exists():
            raise TrainingFailed(f"training job wrote no adapter under {job_dir}")
        return json.loads(summary_path.read_text())

    async def _record(self, trigger: RetrainTrigger, outcome: RetrainOutcome) -> None:
        status = {"registered": "ok", "rejected": "warn", "skipped": "insufficient_data",
                  "declined": "insufficient_data"}.get(outcome.outcome, "alert")
        details = outcome.as_dict()
        details.pop("eval", None)
        details["eval"] = outcome.eval
        event = MonitorResult(tenant=trigger.tenant, monitor=MONITOR, metric=METRIC, model=trigger.model,
                              model_version=outcome.version_id, window_start_ms=outcome.dataset.get("window_start_ms", 0),
                              window_end_ms=outcome.dataset.get("window_end_ms", 0),
                              value={"registered": 1.0, "rejected": 0.0}.get(outcome.outcome, -1.0),
                              status=status, details=json.dumps(details, default=str))  # type: ignore[arg-type]
        await write_events(self.store, [event])


def job_env() -> dict[str, str]:
    """The environment of a training job: this one, with passive OpenMP waits (see retrain.train)."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "TOKENIZERS_PARALLELISM": "false"}


def _write_recipe(recipe: Recipe, job_dir: Path) -> None:
    import yaml

    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.hyperparameters(), sort_keys=False))


def _params(trigger: RetrainTrigger) -> dict[str, Any]:
    try:
        value = json.loads(trigger.params or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _brief(dataset: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dataset.items() if k not in ("feedback_ids", "query")}


def _brief_eval(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if isinstance(v, int | float | bool | str) or k == "reasons"}


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def clean_job(job_dir: Path) -> None:
    """Remove a job's checkpoints (the adapter and logs stay): what a finished job keeps on disk."""
    shutil.rmtree(Path(job_dir) / "checkpoints", ignore_errors=True)
