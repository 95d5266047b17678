"""`servoloop models …`: list, show (with lineage), promote, rollback, canary, reject, export; and the release
commands (card, changelog, archive, gc, reproduce, retire: servoloop/commands/release.py).

The registry lives in the process that owns the store. With the embedded store (chDB) that is the running
`servoloop up`, so these commands go through its admin HTTP API (`--url`, `--key`, or $SERVOLOOP_URL,
$SERVOLOOP_ADMIN_KEY; the key needs the admin scope). With a ClickHouse server (`events.store.kind:
clickhouse`) `--direct` reads and writes the store itself.

Actions are requests: the command records one, waits until the registry answers it (the version's new state,
or the refusal and its reason), and exits 0 when applied, 2 when refused or on any error (unknown model or
version, bad key, unreachable API).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.table import Table

from schemas.errors import (
    Conflict,
    DeadlineExceeded,
    EngineUnavailable,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServoloopError,
    Unauthenticated,
)
from servoloop.commands.options import ConfigOpt, DirectOpt, JsonOpt, KeyOpt, UrlOpt

app = typer.Typer(help="Model versions: list, show lineage, promote, roll back, canary, reject, export, card, "
                       "changelog, archive, gc, reproduce, retire.",
                  no_args_is_help=True)
console = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000"


class Backend(Protocol):
    async def models(self) -> list[str]: ...
    async def versions(self, model: str, tenant: str | None = None) -> dict[str, Any]: ...
    async def version(self, model: str, version: str) -> dict[str, Any]: ...
    async def lineage(self, inference_id: str) -> dict[str, Any]: ...
    async def request(self, model: str, version: str, action: str, reason: str, share: float) -> dict[str, Any]: ...
    async def aclose(self) -> None: ...


_BY_STATUS: dict[int, type[ServoloopError]] = {400: InvalidRequest, 401: Unauthenticated, 403: PermissionDenied,
                                               404: NotFound, 409: Conflict}


class HttpBackend:
    """The admin API of a running `servoloop up`."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        import httpx

        if not key:
            raise Unauthenticated("an admin key is needed: pass --key or set SERVOLOOP_ADMIN_KEY "
                                  "(create one: servoloop keys create --tenant ops --scope admin)")
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s,
                                         headers={"Authorization": f"Bearer {key}"})

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = await self._client.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise EngineUnavailable(f"cannot reach the admin API at {self.url} ({type(e).__name__}: {e}); "
                                    "is `servoloop up` running? (--url / $SERVOLOOP_URL)") from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                message, code = err["message"], err.get("code")
            except (ValueError, KeyError, TypeError):
                message, code = r.text[:300] or r.reason_phrase, None
            cls = _BY_STATUS.get(r.status_code, ServoloopError)
            error = cls(message)
            if code:
                error.code = code
            raise error
        return r.json()

    async def models(self) -> list[str]:
        return [m["model"] for m in (await self._call("GET", "/admin/v1/models"))["models"]]

    async def versions(self, model: str, tenant: str | None = None) -> dict[str, Any]:
        return await self._call("GET", f"/admin/v1/models/{model}/versions",
                                params={"tenant": tenant} if tenant else None)

    async def version(self, model: str, version: str) -> dict[str, Any]:
        return await self._call("GET", f"/admin/v1/models/{model}/versions/{version}")

    async def lineage(self, inference_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/admin/v1/lineage/{inference_id}")

    async def request(self, model: str, version: str, action: str, reason: str, share: float) -> dict[str, Any]:
        return await self._call("POST", f"/admin/v1/models/{model}/requests",
                                json={"version": version, "action": action, "reason": reason, "share": share})

    async def aclose(self) -> None:
        await self._client.aclose()


class StoreBackend:
    """A ClickHouse server, read and written directly (requests are applied here, through a registry)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.store: Any = None

    async def _open(self) -> Any:
        from feedback.store import migrate, open_store

        if self.store is None:
            if self.settings.events.store.kind != "clickhouse":
                raise FailedPrecondition("--direct needs events.store.kind: clickhouse; the embedded store belongs "
                                         "to `servoloop up`: use its admin API (--url, --key)")
            self.store = await open_store(self.settings.events.store, data_dir=self.settings.data_dir)
            await migrate(self.store)
        return self.store

    async def models(self) -> list[str]:
        rows = (await (await self._open()).query("SELECT DISTINCT model FROM model_events ORDER BY model")).to_pylist()
        return [r["model"] for r in rows]

    async def versions(self, model: str, tenant: str | None = None) -> dict[str, Any]:
        import dataclasses

        from retrain.registry import list_versions, served_versions

        views = [v for v in await list_versions(await self._open(), model, tenant, with_global=True)
                 if v.model == model]
        if not views:
            raise NotFound(f"unknown model {model!r} (no versions registered)")
        return {"model": model, "tenant": tenant, **served_versions(views, tenant),
                "versions": [dataclasses.asdict(v) for v in views]}

    async def version(self, model: str, version: str) -> dict[str, Any]:
        from retrain.lineage import version_lineage

        return await version_lineage(await self._open(), model, version)

    async def lineage(self, inference_id: str) -> dict[str, Any]:
        from retrain.lineage import inference_lineage

        return await inference_lineage(await self._open(), inference_id)

    async def request(self, model: str, version: str, action: str, reason: str, share: float) -> dict[str, Any]:
        import getpass

        from retrain.registry import StoreRegistry, get_version
        from retrain.requests import RequestWorker, request_event

        store = await self._open()
        current = await get_version(store, model, version)
        # Applied here and now, so the request is not stored: a `servoloop up` sharing this server must not
        # apply it a second time. The answer row still names the request's id, as every answer does.
        event = request_event(model=model, version_id=version, action=action, actor=f"cli:{getpass.getuser()}",
                              reason=reason, share=share, base_model=current.base_model,
                              adapter_path=current.adapter_path, previous_state=current.state)
        sink = None
        if self.settings.events.broker.mode == "external":  # gateways learn of the step from the `models` topic
            from feedback.sink import build_event_sink

            sink = build_event_sink(self.settings.events, spool_dir=self.settings.data_dir / "models-cli-spool")
            await sink.start()
        try:
            registry = StoreRegistry(store, self.settings.data_dir / "artifacts",
                                     publish=sink.publish if sink is not None else None)
            await RequestWorker(registry).apply(event)
        finally:
            if sink is not None:
                await sink.aclose()
        return {"event_id": event.event_id}

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()


def _backend(url: str, key: str, direct: bool, config: Path | None) -> Backend:
    if direct:
        from servoloop.settings import load_settings

        return StoreBackend(load_settings(config))
    return HttpBackend(url, key)


def _run(backend: Backend, work: Any) -> Any:
    async def go() -> Any:
        try:
            return await work(backend)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) if ms else "-"


@app.command("list")
def list_(model: Annotated[str | None, typer.Argument(help="only this model")] = None,
          tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant's versions and the global "
                                                     "ones it falls back to (a tenant-scoped key: its own)")] = None,
          url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
          as_json: JsonOpt = False) -> None:
    """List every model's versions with their current state and scope (global or a tenant's; the active marked)."""

    async def work(b: Backend) -> list[dict[str, Any]]:
        names = [model] if model else await b.models()
        return [await b.versions(m, tenant) for m in names]

    out = _run(_backend(url, key, direct, config), work)
    if as_json:
        _print_json(out)
        return
    table = Table("model", "tenant", "version", "state", "share", "updated (UTC)", "by", "artifact")
    for m in out:
        for v in m["versions"]:
            state = f"[bold green]{v['state']}[/bold green]" if v["state"] == "active" else v["state"]
            table.add_row(m["model"], v.get("tenant") or "(global)", v["version_id"], state, f"{v['canary_share']:.0%}" if v["canary_share"] else "",
                          _when(v["updated_ms"]), v["actor"], (v["artifact_sha256"] or "")[:12])
    Console().print(table)


@app.command()
def show(model: Annotated[str | None, typer.Argument(help="the model")] = None,
         version: Annotated[str | None, typer.Argument(help="the version id")] = None,
         lineage: Annotated[bool, typer.Option("--lineage", help="also the trigger, its evidence, the dataset and "
                                                                 "the source feedback rows")] = False,
         inference: Annotated[str | None, typer.Option("--inference", help="the lineage of the version that "
                                                                           "served this inference id")] = None,
         url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show one version (state, history, lineage), or with --inference ID the chain behind a served response."""
    if inference is None and (model is None or version is None):
        raise InvalidRequest("give MODEL VERSION, or --inference ID")
    b = _backend(url, key, direct, config)
    out = _run(b, lambda b: b.lineage(inference) if inference else b.version(model, version))
    if as_json:
        _print_json(out)
        return
    if inference:
        inf = out["inference"]
        print(f"inference {inf['event_id']}: {inf['model']}@{inf['model_version'] or 'base'} "
              f"(tenant {inf['tenant']}, {_when(inf['ts_ms'])} UTC, engine {inf['engine']})")
        if out["version"] is None:
            print(out["note"])
            return
        out, lineage = out["version"], True
    _print_version(out, lineage=lineage)


def _print_version(v: dict[str, Any], *, lineage: bool) -> None:
    print(f"{v['model']}@{v['version_id']}: {v['state']}" + (f" ({v['canary_share']:.0%} of traffic)"
                                                             if v["state"] == "canary" else ""))
    print(f"  base model: {v['base_model']}")
    if v["adapter_path"]:
        print(f"  adapter:    {v['adapter_path']}\n  sha256:     {v['artifact_sha256']}")
    if v.get("promoted_by"):
        print(f"  promoted by: {v['promoted_by']}")
    print("  history:")
    for h in v["history"]:
        print(f"    {_when(h['ts_ms'])}  {h['state']:<18} by {h['actor'] or '-'}: {h['reason']}")
    if not lineage:
        return
    lin = v["lineage"]
    if lin.get("parent_version"):
        print(f"  parent version: {lin['parent_version']}")
    if lin.get("recipe"):
        print(f"  recipe: {json.dumps(lin['recipe'], default=str)}")
    if lin.get("hyperparameters"):
        print(f"  hyperparameters: {json.dumps(lin['hyperparameters'], default=str)}")
    if lin.get("eval"):
        print(f"  eval:   {json.dumps(lin['eval'], default=str)}")
    t = v.get("trigger")
    if t:
        print(f"  trigger {t['event_id']}: {t['method']} on {t['model']}@{t['model_version']} by {t['actor']}: "
              f"{t['reason']} (window {_when(t['window_start_ms'])} .. {_when(t['window_end_ms'])})")
    elif v.get("trigger_id"):
        print(f"  trigger {v['trigger_id']}: not in the store")
    mr = v.get("monitor_result")
    if mr:
        print(f"  evidence: monitor {mr['monitor']} {mr['metric']}={mr['value']:.4g} (threshold {mr['threshold']}, "
              f"{mr['status']}, n={mr['sample_size']})")
    d = v.get("dataset") or {}
    if d:
        print(f"  dataset: sha256 {d.get('sha256', '-')} at {d.get('path', '-')}, window "
              f"{_when(d.get('window_start_ms'))} .. {_when(d.get('window_end_ms'))}")
        if d.get("query"):
            print(f"           query: {d['query']}")
    fb = v.get("feedback") or {}
    if fb.get("source"):
        print(f"  source feedback ({fb['source']}): {fb['count']} rows")
        for r in fb["rows"][:20]:
            value = r["thumbs"] if r["thumbs"] is not None else r["rating"] if r["rating"] is not None else r["kind"]
            print(f"    {r['event_id']}  {r['kind']:<10} {value!s:<6} on {r['target_id']}")
        if fb["count"] > 20:
            print(f"    … {fb['count'] - 20} more (--json lists up to {len(fb['rows'])})")


def _act(action: str, model: str, version: str, reason: str, share: float, url: str, key: str, direct: bool,
         config: Path | None, wait_s: float) -> None:
    async def work(b: Backend) -> dict[str, Any]:
        req = await b.request(model, version, action, reason, share)
        deadline = time.monotonic() + wait_s
        while True:
            v = await b.version(model, version)
            answer = next((h for h in v["history"] if h["request_id"] == req["event_id"]), None)
            if answer is not None:
                return {"request_id": req["event_id"], "answer": answer, "version": v}
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"the {action} request {req['event_id']} is recorded but the registry did not "
                                       f"answer within {wait_s:.0f} s (is `servoloop up` running its registry?)")
            await asyncio.sleep(0.3)

    out = _run(_backend(url, key, direct, config), work)
    answer = out["answer"]
    if answer["state"] == "request_refused":
        raise Conflict(answer["reason"])
    # The answering row's state: the version view may have been read a moment before the answer was written.
    console.print(f"[green]{action}[/green] {model}@{version}: {answer['state']} (request {out['request_id']})")


ReasonOpt = Annotated[str, typer.Option("--reason", help="why (recorded with the step)")]
WaitOpt = Annotated[float, typer.Option("--wait", help="seconds to wait for the registry's answer")]


@app.command()
def promote(model: str, version: str, reason: ReasonOpt = "", url: UrlOpt = DEFAULT_URL, key: KeyOpt = "",
            direct: DirectOpt = False, config: ConfigOpt = None, wait: WaitOpt = 30.0) -> None:
    """Make VERSION the active one (the previous active version is retired)."""
    _act("promote", model, version, reason, 0.0, url, key, direct, config, wait)


@app.command()
def rollback(model: str, version: str, reason: ReasonOpt = "", url: UrlOpt = DEFAULT_URL, key: KeyOpt = "",
             direct: DirectOpt = False, config: ConfigOpt = None, wait: WaitOpt = 30.0) -> None:
    """Roll back VERSION: a canary just ends; the active version gives way to the one active before it (or base)."""
    _act("rollback", model, version, reason, 0.0, url, key, direct, config, wait)


@app.command()
def canary(model: str, version: str,
           share: Annotated[float, typer.Option("--share", min=0.0, max=1.0,
                                                help="share of traffic, (0, 1]; 0: the registry's default")] = 0.1,
           reason: ReasonOpt = "", url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False,
           config: ConfigOpt = None, wait: WaitOpt = 30.0) -> None:
    """Send a candidate to canary with SHARE of traffic (one canary per model at a time)."""
    _act("canary", model, version, reason, share, url, key, direct, config, wait)


@app.command()
def reject(model: str, version: str, reason: ReasonOpt = "", url: UrlOpt = DEFAULT_URL, key: KeyOpt = "",
           direct: DirectOpt = False, config: ConfigOpt = None, wait: WaitOpt = 30.0) -> None:
    """Reject a candidate (it can never serve)."""
    _act("reject", model, version, reason, 0.0, url, key, direct, config, wait)


@app.command()
def export(model: str, version: str,
           out: Annotated[Path | None, typer.Option("--out", help="directory to write (must not exist or be empty; "
                                                                  "with --format default DATA_DIR/exports/...)")] = None,
           merge: Annotated[bool, typer.Option("--merge/--adapter", help="merged full weights (default) or the "
                                                                         "adapter alone")] = True,
           base: Annotated[Path | None, typer.Option("--base", help="the base model directory (default: the "
                                                                    "version's base_model, resolved locally)")] = None,
           fmt: Annotated[str | None, typer.Option("--format", help="peft | merged | int8 (weight-only, CPU) | "
                                                                    "bnb-int8 | bnb-nf4 (CUDA only): export, measure "
                                                                    "size, load time, tokens/s and quality delta, and "
                                                                    "record them beside the artifacts")] = None,
           measure: Annotated[bool, typer.Option("--measure/--no-measure", help="with --format: measure and "
                                                                                "record the figures")] = True,
           eval_texts: Annotated[int, typer.Option("--eval-texts", min=1, help="with --format: held-out prose "
                                                                              "texts for perplexity")] = 16,
           eval_pairs: Annotated[int, typer.Option("--eval-pairs", min=1, help="with --format: held-out pairs for "
                                                                              "preference accuracy")] = 48,
           url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
           as_json: JsonOpt = False) -> None:
    """Export VERSION: its adapter (verified against its recorded hash) merged into the base weights, or alone;
    with --format, any export format, measured against the unquantized version and recorded."""
    if fmt is not None:
        from servoloop.commands.release import export_release

        export_release(model, version, fmt, out, base, measure, url, key, direct, config, as_json,
                       eval_texts=eval_texts, eval_pairs=eval_pairs)
        return
    if out is None:
        raise InvalidRequest("--out DIR is required (or give --format)")
    from servoloop.settings import load_settings

    settings = load_settings(config)
    v = _run(_backend(url, key, direct, config), lambda b: b.version(model, version))
    if not v["adapter_path"]:
        raise FailedPrecondition(f"{model}@{version} has no adapter (it is the base model): nothing to export")
    if out.exists() and any(out.iterdir()):
        raise FailedPrecondition(f"--out {out} is not empty")
    from schemas.artifacts import fetch_verified

    adapter = fetch_verified(v["adapter_path"], v["artifact_sha256"], settings.data_dir / "artifact-cache")
    console.print(f"adapter {v['adapter_path']} verified (sha256 {v['artifact_sha256'][:12]}…)")
    if not merge:
        import shutil

        shutil.copytree(adapter, out, dirs_exist_ok=True)
        console.print(f"[green]exported[/green] the adapter of {model}@{version} to {out}")
        return
    base_dir = base or _resolve_base(v["base_model"], settings)
    from retrain.export import merge_adapter

    merge_adapter(base_dir, adapter, out)
    (out / "servoloop_lineage.json").write_text(json.dumps(
        {"model": model, "version_id": version, "base_model": v["base_model"], "base_dir": str(base_dir),
         "artifact_sha256": v["artifact_sha256"], "lineage": v["lineage"]}, indent=2, default=str))
    console.print(f"[green]exported[/green] {model}@{version} merged into {base_dir} -> {out}")


def _resolve_base(name: str, settings: Any) -> Path:
    """The local directory of base model `name`: a path as is, a configured model's path, or data_dir/models/name."""
    candidates = [Path(name)] if name else []
    candidates += [Path(m.path) for m in settings.with_default_model().gateway.models
                   if m.path and name in (m.name, Path(m.path).name)]
    candidates.append(settings.data_dir / "models" / name)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise NotFound(f"base model {name!r} is not a local model directory (looked in: "
                   f"{', '.join(str(c) for c in candidates)}); pass --base DIR")


from servoloop.commands.release import register as _register_release  # noqa: E402  (it reads this module's helpers)

_register_release(app)
