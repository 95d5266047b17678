"""The model registry over the store: append-only `ModelEvent` rows, adapters copied into an artifact store.

`StoreRegistry` implements `retrain.lifecycle.Registry`. Every step writes its rows to the store first (the
store is authoritative; a version's state is its latest lifecycle row) and then hands them to `publish` (the
event sink: Kafka topic `models`, which every gateway watches). Rules it keeps:

- one `active` version per model: promoting X writes a `retired` row for the previous active version
  (reason naming X), then X's `active` row. The base model is the implicit version `base` (adapter-less),
  active while no adapter is; promoting the first adapter retires it like any version.
- rolling back the active version re-activates the most recently retired version that was not rolled
  back itself (a new `active` row, reason naming the rolled-back one), or `base`.
- rolling back a canary only ends the canary.
- at most one canary per model: starting a second is an IllegalTransition naming the running one (end
  it with promote or rollback first): a silent replacement would lose the first canary's comparison.
- scopes: a version is global (tenant '') or one tenant's, fixed at registration and carried by every row of
  it (the `tenant` column). The rules above hold per (model, scope): one active and one canary per tenant; a
  tenant's promotion retires only that tenant's previous version; rolling back a tenant's only version leaves
  the tenant on the global version (the implicit `base` belongs to the global scope).
- writes for one model are serialised in-process (an asyncio.Lock per model), so two concurrent promotes
  cannot both win: the second sees the first's row and is refused (or retires it, if it was legal).

Rows are stamped with a per-model strictly increasing time, so the latest row is unambiguous.

Every row of a version carries the version's lineage (the JSON recorded at registration, see
`retrain/lineage.py` for its keys) plus what each step added (`promotion`, `canary`, `rollback`,
`rejection`, `retirement`, `reactivation`: who, when, why, evidence). A row written in answer to a request
(`<action>_requested` rows from the dashboard or the canary monitor) also names it as `request_id`; that key
is not carried forward. `RequestWorker` (retrain/requests.py) applies such requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feedback.store import Store, write_events
from retrain.lifecycle import STATES, Action, IllegalTransition, ModelVersion, State, next_state
from schemas.artifacts import ArtifactMismatch, is_local, tree_sha256
from schemas.errors import Conflict, InvalidRequest, NotFound
from schemas.events import Event, ModelEvent, now_ms

log = logging.getLogger(__name__)

BASE_VERSION = "base"
"""The implicit version of every model: the base model without an adapter."""
REQUEST_REFUSED = "request_refused"
"""State of the row answering a request the registry could not apply (its reason is the error)."""
_VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}")
_CARRIED_NOT = frozenset({"request_id"})
_COLUMNS = ("event_id, toUnixTimestamp64Milli(ts) AS ts_ms, tenant, model, version_id, base_model, adapter_path, "
            "state, previous_state, reason, actor, lineage, artifact_sha256, canary_share")


class VersionExists(Conflict):
    """A version with this id is already registered for the model."""

    code = "version_exists"


def is_request(state: str) -> bool:
    """True for rows that ask for or answer a request rather than record a lifecycle state."""
    return state.endswith("_requested") or state == REQUEST_REFUSED


def parse_lineage(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def new_version_id(ts_ms: int) -> str:
    """A sortable, readable version id: `v20261123-141500-ab12` (UTC time of registration + 4 random hex)."""
    stamp = datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y%m%d-%H%M%S")
    return f"v{stamp}-{secrets.token_hex(2)}"


def _view(row: dict[str, Any]) -> ModelVersion:
    lineage = {k: v for k, v in parse_lineage(row["lineage"]).items() if k not in _CARRIED_NOT}
    return ModelVersion(model=row["model"], version_id=row["version_id"], state=row["state"],
                        base_model=row["base_model"], adapter_path=row["adapter_path"],
                        artifact_sha256=row["artifact_sha256"], canary_share=float(row["canary_share"] or 0.0),
                        lineage=lineage, updated_ms=int(row["ts_ms"]), actor=row["actor"], reason=row["reason"],
                        tenant=row.get("tenant") or "")


async def model_rows(store: Store, model: str | None = None, version_id: str | None = None) -> list[dict[str, Any]]:
    """Every `model_events` row (of `model`, of `version_id`), oldest first, lineage as stored (JSON text)."""
    where, params = "1", {}
    if model is not None:
        where += " AND model = {model:String}"
        params["model"] = model
    if version_id is not None:
        where += " AND version_id = {version_id:String}"
        params["version_id"] = version_id
    table = await store.query(f"SELECT {_COLUMNS} FROM model_events FINAL WHERE {where} ORDER BY ts, event_id",
                              params)
    return table.to_pylist()


def current_views(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], ModelVersion]:
    """(model, version) -> the version as its latest lifecycle row says (request rows skipped), in first-seen order."""
    out: dict[tuple[str, str], ModelVersion] = {}
    for r in rows:
        if r["state"] in STATES:
            out[(r["model"], r["version_id"])] = _view(r)
    return out


def implicit_base(model: str, versions: Sequence[ModelVersion]) -> ModelVersion:
    """The base model as a version (active when no adapter is), for a model that has no `base` rows yet."""
    base_model = next((v.base_model for v in versions if v.base_model), model)
    active = any(v.state == "active" and not v.tenant for v in versions)
    return ModelVersion(model=model, version_id=BASE_VERSION, state="retired" if active else "active",
                        base_model=base_model, reason="the base model (implicit)")


async def list_versions(store: Store, model: str | None = None, tenant: str | None = None, *,
                        with_global: bool = False) -> list[ModelVersion]:
    """Every version (per model: the implicit `base` first if it has no rows, then by registration), current state.

    `tenant` None: every scope; else only that tenant's versions ('' = the global ones), plus the global ones
    when `with_global` (what a tenant is served when it has no version of its own).
    """
    views = current_views(await model_rows(store, model))
    by_model: dict[str, list[ModelVersion]] = {}
    for (m, _), v in views.items():
        by_model.setdefault(m, []).append(v)
    out: list[ModelVersion] = []
    for m in sorted(by_model):
        vs = by_model[m]
        if not any(v.version_id == BASE_VERSION for v in vs):
            vs = [implicit_base(m, vs), *vs]
        if tenant is not None:
            vs = [v for v in vs if v.tenant == tenant or (with_global and not v.tenant)]
        out.extend(vs)
    return out


def served_versions(views: Sequence[ModelVersion], tenant: str | None) -> dict[str, str | None]:
    """The `active` and `canary` version ids `tenant` is served (None or '': the global ones).

    A tenant with versions of its own in `active` or `canary` gets those (its own active, else the global active;
    its own canary only); a tenant with neither is served the global routing, canary included.
    """
    def pick(state: str, scope: str) -> str | None:
        return next((v.version_id for v in views if v.state == state and v.tenant == scope), None)

    if not tenant:
        return {"active": pick("active", ""), "canary": pick("canary", "")}
    own_active, own_canary = pick("active", tenant), pick("canary", tenant)
    if own_active is None and own_canary is None:
        return {"active": pick("active", ""), "canary": pick("canary", "")}
    return {"active": own_active or pick("active", ""), "canary": own_canary}


async def get_version(store: Store, model: str, version_id: str) -> ModelVersion:
    """One version's current view; raises NotFound for an unknown model or version."""
    rows = await model_rows(store, model)
    if not rows:
        raise NotFound(f"unknown model {model!r} (no versions registered)", param="model")
    views = current_views(rows)
    if (model, version_id) in views:
        return views[(model, version_id)]
    if version_id == BASE_VERSION:
        return implicit_base(model, list(views.values()))
    raise NotFound(f"model {model!r} has no version {version_id!r}", param="version",
                   details={"versions": [v for (_, v) in views]})


class StoreRegistry:
    """The `Registry` over a `Store`; see the module docstring for its rules.

    `artifacts_root` is a local directory or any fsspec URL; adapters go to `<root>/<model>/<version_id>/`.
    `publish` receives every row after it is stored (None: store only). `clock` gives epoch ms.
    """

    def __init__(self, store: Store, artifacts_root: str | Path, publish: Callable[[Event], None] | None = None, *,
                 clock: Callable[[], int] = now_ms, tenant: str = "", actor: str = "registry") -> None:
        self.store = store
        self.artifacts_root = str(artifacts_root).rstrip("/")
        self.publish = publish
        self.clock = clock
        self.tenant = tenant
        self.actor = actor
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, model: str) -> asyncio.Lock:
        """The lock serialising writes for `model` (held by every writing method)."""
        return self._locks.setdefault(model, asyncio.Lock())

    # -- reads ---------------------------------------------------------------------------------------------------

    async def get(self, model: str, version_id: str) -> ModelVersion:
        return await get_version(self.store, model, version_id)

    async def versions(self, model: str | None = None, tenant: str | None = None) -> list[ModelVersion]:
        return await list_versions(self.store, model, tenant)

    async def active(self, model: str, tenant: str = "") -> ModelVersion | None:
        """The active version of scope `tenant` ('': global, `base` when no adapter is active), or None (a model
        with no versions, or a tenant with no active version of its own)."""
        views = [v for v in await list_versions(self.store, model, tenant) if v.model == model]
        return next((v for v in views if v.state == "active"), None)

    async def canary(self, model: str, tenant: str = "") -> ModelVersion | None:
        views = current_views(await model_rows(self.store, model))
        return next((v for v in views.values() if v.state == "canary" and v.tenant == tenant), None)

    # -- writes --------------------------------------------------------------------------------------------------

    async def register_candidate(self, *, model: str, base_model: str, adapter_dir: Path, lineage: dict[str, Any],
                                 actor: str, version_id: str | None = None, tenant: str | None = None
                                 ) -> ModelVersion:
        """Copy `adapter_dir` to `<artifacts_root>/<model>/<version_id>/`, hash it, record a `candidate`.

        `tenant`: the version's scope ('' global; None: this registry's default `tenant`). Raises InvalidRequest
        for a bad id, tenant or a missing adapter directory, VersionExists for a taken id, ArtifactMismatch if
        the copy does not hash like the source.
        """
        _check_name(model, "model")
        scope = self.tenant if tenant is None else tenant
        if scope:
            _check_name(scope, "tenant")
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise InvalidRequest(f"{str(adapter_dir)!r} is not a PEFT adapter directory (no adapter_config.json)",
                                 param="adapter_dir")
        async with self.lock(model):
            rows = await model_rows(self.store, model)
            ts = self._next_ts(rows)
            version_id = version_id or new_version_id(ts)
            _check_name(version_id, "version_id")
            if version_id == BASE_VERSION or any(r["version_id"] == version_id for r in rows):
                raise VersionExists(f"model {model!r} already has a version {version_id!r}", param="version_id")
            url = f"{self.artifacts_root}/{model}/{version_id}"
            sha = await asyncio.to_thread(_copy_artifact, adapter_dir, url)
            full = {"base_model": base_model, **lineage, "artifact_sha256": sha, "adapter_path": url,
                    "registered_by": actor, "registered_ms": ts, "tenant": scope}
            event = ModelEvent(ts_ms=ts, tenant=scope, model=model, version_id=version_id,
                               base_model=base_model, adapter_path=url, state="candidate", previous_state="",
                               reason="registered", actor=actor, lineage=json.dumps(full, default=str),
                               artifact_sha256=sha)
            await self._emit([event])
            log.info("registered %s@%s (%s, sha256 %s)", model, version_id, url, sha[:12])
            return _view(_row(event))

    async def reject(self, model: str, version_id: str, *, reasons: list[str], actor: str,
                     evidence: dict[str, Any] | None = None, request_id: str = "") -> ModelVersion:
        step = {"reasons": list(reasons), "evidence": evidence or {}}
        return await self._transition(model, version_id, "reject", actor=actor, reason="; ".join(reasons) or
                                      "rejected", key="rejection", step=step, request_id=request_id)

    async def start_canary(self, model: str, version_id: str, *, share: float, actor: str, reason: str = "",
                           request_id: str = "") -> ModelVersion:
        """Send a candidate to canary with `share` of traffic (0 < share <= 1); one canary per model at a time."""
        if not 0.0 < share <= 1.0:
            raise InvalidRequest(f"canary share must be in (0, 1]; got {share}", param="share")
        return await self._transition(model, version_id, "canary", actor=actor,
                                      reason=reason or f"canary at {share:.0%} of traffic", key="canary",
                                      step={"share": share}, share=share, request_id=request_id)

    async def promote(self, model: str, version_id: str, *, actor: str, reason: str = "",
                      evidence: dict[str, Any] | None = None, request_id: str = "") -> ModelVersion:
        return await self._transition(model, version_id, "promote", actor=actor, reason=reason or "promoted",
                                      key="promotion", step={"evidence": evidence or {}}, request_id=request_id)

    async def rollback(self, model: str, version_id: str, *, actor: str, reason: str = "",
                       evidence: dict[str, Any] | None = None, request_id: str = "") -> ModelVersion:
        return await self._transition(model, version_id, "rollback", actor=actor, reason=reason or "rolled back",
                                      key="rollback", step={"evidence": evidence or {}}, request_id=request_id)

    async def decommission(self, model: str, version_id: str, *, actor: str, reason: str = "",
                           evidence: dict[str, Any] | None = None, request_id: str = "") -> ModelVersion:
        """Mark a version that serves nothing as never to serve again (checks of use: retrain/release/retire.py)."""
        return await self._transition(model, version_id, "decommission", actor=actor,
                                      reason=reason or "decommissioned", key="decommission",
                                      step={"evidence": evidence or {}}, request_id=request_id)

    async def refuse_request(self, request: ModelEvent, error: Exception) -> ModelEvent:
        """Record that `request` could not be applied: a `request_refused` row whose reason is the error."""
        code = getattr(error, "code", type(error).__name__)
        message = getattr(error, "message", str(error))
        async with self.lock(request.model):
            rows = await model_rows(self.store, request.model)
            current = current_views(rows).get((request.model, request.version_id))
            event = ModelEvent(
                ts_ms=self._next_ts(rows), tenant=current.tenant if current else request.tenant, model=request.model,
                version_id=request.version_id, base_model=request.base_model, adapter_path=request.adapter_path,
                state=REQUEST_REFUSED, previous_state=current.state if current else "",
                reason=f"{request.state} by {request.actor or 'unknown'} refused: {message}", actor=self.actor,
                lineage=json.dumps({"request_id": request.event_id, "requested": request.state,
                                    "error": {"code": code, "message": message}}))
            await self._emit([event])
            return event

    # -- internals -----------------------------------------------------------------------------------------------

    async def _transition(self, model: str, version_id: str, action: Action, *, actor: str, reason: str, key: str,
                          step: dict[str, Any], share: float = 0.0, request_id: str = "") -> ModelVersion:
        async with self.lock(model):
            rows = await model_rows(self.store, model)
            views = current_views(rows)
            if not rows:
                raise NotFound(f"unknown model {model!r} (no versions registered)", param="model")
            if version_id == BASE_VERSION and (model, version_id) not in views:
                current = implicit_base(model, list(views.values()))
            elif (model, version_id) in views:
                current = views[(model, version_id)]
            else:
                raise NotFound(f"model {model!r} has no version {version_id!r}", param="version",
                               details={"versions": [v for (_, v) in views]})
            if version_id == BASE_VERSION:
                raise IllegalTransition(f"the base model takes no {action}: it is active exactly when no adapter is "
                                        "(roll back the active version to return to it)",
                                        details={"state": current.state, "action": action, "allowed": []})
            to = next_state(current.state, action)
            ts = self._next_ts(rows)
            events: list[ModelEvent] = []
            scope = current.tenant  # every rule below holds within the version's scope
            others = [v for (_, vid), v in views.items() if vid != version_id and v.tenant == scope]
            if action == "canary" and (running := next((v for v in others if v.state == "canary"), None)):
                where = f"model {model!r}" + (f" for tenant {scope!r}" if scope else "")
                raise IllegalTransition(
                    f"{where} already has a canary ({running.version_id!r}); promote or roll it back first",
                    details={"state": current.state, "action": action, "canary": running.version_id})
            global_scope = not scope
            if action == "promote":
                previous = next((v for v in others if v.state == "active"), None)
                if previous is None and global_scope and BASE_VERSION not in (vid for (_, vid) in views):
                    previous = implicit_base(model, list(views.values()))
                    previous = previous if previous.state == "active" else None
                if previous is not None:
                    events.append(self._row(previous, "retired", ts, actor=actor,
                                            reason=f"superseded by {version_id}", key="retirement",
                                            step={"by": actor, "ts_ms": ts, "superseded_by": version_id}))
                    ts += 1
            mine = len(events)
            stamp = {"by": actor, "ts_ms": ts, "reason": reason, **step}
            events.append(self._row(current, to, ts, actor=actor, reason=reason, key=key, step=stamp, share=share,
                                    request_id=request_id))
            if action == "rollback" and current.state == "active":
                retired = [v for v in others if v.state == "retired"]
                if global_scope and BASE_VERSION not in (vid for (_, vid) in views):
                    retired.append(implicit_base(model, list(views.values())))
                # globally the implicit base (retired while an adapter is active, never rolled back) is always
                # there; a tenant with nothing retired falls back to the global version
                if retired:
                    target = max(retired, key=lambda v: v.updated_ms)
                    events.append(self._row(target, "active", ts + 1, actor=actor,
                                            reason=f"re-activated: {version_id} rolled back", key="reactivation",
                                            step={"by": actor, "ts_ms": ts + 1, "replaces": version_id,
                                                  "reason": reason}))
            await self._emit(events)
            log.info("%s %s@%s: %s -> %s by %s", action, model, version_id, current.state, to, actor)
            return _view(_row(events[mine]))

    def _row(self, v: ModelVersion, state: State, ts: int, *, actor: str, reason: str, key: str,
             step: dict[str, Any], share: float = 0.0, request_id: str = "") -> ModelEvent:
        lineage = {**v.lineage, key: step}
        if v.version_id == BASE_VERSION:
            lineage.setdefault("base_model", v.base_model)
        if request_id:
            lineage["request_id"] = request_id
        return ModelEvent(ts_ms=ts, tenant=v.tenant, model=v.model, version_id=v.version_id,
                          base_model=v.base_model, adapter_path=v.adapter_path, state=state, previous_state=v.state,
                          reason=reason, actor=actor, lineage=json.dumps(lineage, default=str),
                          artifact_sha256=v.artifact_sha256, canary_share=share)

    def _next_ts(self, rows: Sequence[dict[str, Any]]) -> int:
        last = max((int(r["ts_ms"]) for r in rows), default=0)
        return max(self.clock(), last + 1)

    async def _emit(self, events: list[ModelEvent]) -> None:
        await write_events(self.store, events)  # authoritative first: a gateway may read the store on the event
        if self.publish is not None:
            for e in events:
                try:
                    self.publish(e)
                except Exception:  # the store holds the row; gateways polling the store still see it
                    log.exception("publishing model event %s failed", e.event_id)


def _row(event: ModelEvent) -> dict[str, Any]:
    return {"tenant": event.tenant, "model": event.model, "version_id": event.version_id, "state": event.state,
            "base_model": event.base_model, "adapter_path": event.adapter_path,
            "artifact_sha256": event.artifact_sha256, "canary_share": event.canary_share,
            "lineage": event.lineage, "ts_ms": event.ts_ms, "actor": event.actor, "reason": event.reason}


def _check_name(value: str, field: str) -> None:
    if not _VERSION_ID.fullmatch(value):
        raise InvalidRequest(f"{field} must be 1-200 characters of letters, digits and ._:@+- (got {value[:40]!r})",
                             param=field)


def _copy_artifact(source: Path, url: str) -> str:
    """Copy the adapter tree to `url` and return its hash, checked on the copy when the copy is local."""
    sha = tree_sha256(source)
    if is_local(url):
        dest = Path(url[len("file://"):] if url.startswith("file://") else url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            got = tree_sha256(staging)
            if got != sha:
                raise ArtifactMismatch(f"copy of {str(source)!r} hashes to {got[:12]}…, expected {sha[:12]}…")
            if dest.exists():  # left by a registration that crashed before its row was written: the id is free
                shutil.rmtree(dest)
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return sha
    import fsspec  # only for remote artifact stores

    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    fs.put(str(source).rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
    return sha
