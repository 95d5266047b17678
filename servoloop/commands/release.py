"""`servoloop models …` release commands: export --format, card, changelog, archive, gc, reproduce, retire.

They read versions and lineage like the other `models` commands (the admin API of `servoloop up`, or
`--direct` with a ClickHouse server) and do the heavy work (exports, training) in this process, on the
artifacts the registry recorded (verified against their hashes). Release files (model card, export records)
go beside the artifacts, `<artifacts root>/<model>/_release/<version>/`. Registered on the `models` app by
`register(app)`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from schemas.errors import FailedPrecondition
from servoloop.commands.options import ConfigOpt, DirectOpt, JsonOpt, KeyOpt, UrlOpt

console = Console(stderr=True)

ReasonOpt = Annotated[str, typer.Option("--reason", help="why (recorded with the step)")]
WaitOpt = Annotated[float, typer.Option("--wait", help="seconds to wait for the registry's answer")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _m() -> Any:
    from servoloop.commands import models

    return models


def _view(d: dict[str, Any]) -> Any:
    from retrain.lifecycle import ModelVersion

    names = {f.name for f in dataclasses.fields(ModelVersion)}
    return ModelVersion(**{k: v for k, v in d.items() if k in names})


def _verified_adapter(v: dict[str, Any], settings: Any) -> Path:
    from schemas.artifacts import fetch_verified

    if not v["adapter_path"]:
        raise FailedPrecondition(f"{v['model']}@{v['version_id']} has no adapter (it is the base model)")
    return fetch_verified(v["adapter_path"], v["artifact_sha256"], settings.data_dir / "artifact-cache")


def export_release(model: str, version: str, fmt: str, out: Path | None, base: Path | None, measure: bool,
                   url: str, key: str, direct: bool, config: Path | None, as_json: bool = False, *,
                   eval_texts: int = 16, eval_pairs: int = 48) -> None:
    """`models export --format FMT`: write the export, measure it against the unquantized version, record it
    (perplexity over `eval_texts` held-out prose texts, preference accuracy over `eval_pairs` held-out pairs)."""
    from retrain.gate import general_texts
    from retrain.release.exports import check_format, export_and_measure, export_version, held_out_pairs
    from retrain.release.records import write_export_record
    from servoloop.settings import load_settings

    m = _m()
    check_format(fmt)  # unknown or GPU-only here: refused before any work
    settings = load_settings(config)
    v = m._run(m._backend(url, key, direct, config), lambda b: b.version(model, version))
    adapter = _verified_adapter(v, settings)
    out = out or settings.data_dir / "exports" / model / version / fmt
    base_dir = base or m._resolve_base(v["base_model"], settings)
    info = {"model": model, "version_id": version, "base_model": v["base_model"], "base_dir": str(base_dir),
            "artifact_sha256": v["artifact_sha256"], "format": fmt}
    if not measure:
        export_version(fmt, base_dir=base_dir, adapter_dir=adapter, out=out)
        (out / "servoloop_export.json").write_text(json.dumps(info, indent=2) + "\n")
        console.print(f"[green]exported[/green] {model}@{version} as {fmt} -> {out} (not measured)")
        return
    figures = export_and_measure(fmt, base_dir=base_dir, adapter_dir=adapter, out=out, info=info,
                                 texts=general_texts(eval_texts), pairs=held_out_pairs(eval_pairs))
    record = {**info, **figures.as_dict(), "out": str(out)}
    where = write_export_record(v["adapter_path"], version, record)
    if as_json:
        m._print_json(record)
    console.print(f"[green]exported[/green] {model}@{version} as {fmt} -> {out}: {figures.size_bytes} bytes, load "
                  f"{figures.load_s:.2f} s, {figures.tokens_per_s:.1f} tokens/s, perplexity "
                  f"{figures.perplexity:.4g} ({figures.perplexity_delta:+.3g} vs unquantized), preference accuracy "
                  f"{figures.preference_accuracy:.3f} ({figures.preference_accuracy_delta:+.3f}), agreement "
                  f"{figures.preference_agreement:.3f}; recorded at {where}")


def register(app: typer.Typer) -> None:
    """Add the release commands to the `models` Typer app."""
    m = _m()

    @app.command()
    def card(model: str, version: str,
             write: Annotated[bool, typer.Option("--write/--no-write", help="also store it beside the artifacts "
                                                                            "(_release/VERSION/MODEL_CARD.md)")] = True,
             url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
             as_json: JsonOpt = False) -> None:
        """Print VERSION's model card (Markdown), generated from the registry: base model, data window and hash,
        recipe, eval-gate results, figures at promotion, exports, limitations, intended use."""
        from retrain.release.cards import render_card, write_card
        from retrain.release.records import export_records

        v = m._run(m._backend(url, key, direct, config), lambda b: b.version(model, version))
        exports = export_records(v["adapter_path"], version)
        where = None
        if write and v["adapter_path"]:
            where, text = write_card(v, exports)
        else:
            text = render_card(v, exports)
        if as_json:
            m._print_json({"model": model, "version_id": version, "markdown": text, "url": where})
            return
        print(text, end="")
        if where:
            console.print(f"stored at {where}")

    @app.command()
    def changelog(model: str, a: Annotated[str, typer.Argument(help="the older version")],
                  b: Annotated[str, typer.Argument(help="the newer version")],
                  url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
                  as_json: JsonOpt = False) -> None:
        """What changed from version A to version B: dataset (hash, window, query), recipe, eval figures, lineage."""
        from retrain.release.changelog import changelog as diff
        from retrain.release.changelog import render_changelog

        async def work(be: Any) -> dict[str, Any]:
            return diff(await be.version(model, a), await be.version(model, b))

        c = m._run(m._backend(url, key, direct, config), work)
        if as_json:
            m._print_json(c)
        else:
            print(render_changelog(c), end="")

    async def _versions(be: Any, model: str) -> list[Any]:
        return [_view(v) for v in (await be.versions(model))["versions"]]

    @app.command()
    def archive(model: str,
                to: Annotated[str, typer.Option("--to", help="destination: any fsspec URL (file://, memory://, s3://)")],
                version: Annotated[list[str] | None, typer.Option("--version", help="only these versions "
                                                                                    "(repeatable; default all)")] = None,
                datasets: Annotated[bool, typer.Option("--datasets/--no-datasets", help="also the dataset "
                                                                                        "snapshots")] = True,
                url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
                as_json: JsonOpt = False) -> None:
        """Copy versions' adapters, release files and dataset snapshots to --to, checksummed (manifest.json)."""
        from retrain.release.retention import archive as copy

        views = m._run(m._backend(url, key, direct, config), lambda be: _versions(be, model))
        if version:
            views = [v for v in views if v.version_id in set(version)]
            missing = set(version) - {v.version_id for v in views}
            if missing:
                raise FailedPrecondition(f"no such version(s) of {model!r}: {', '.join(sorted(missing))}")
        manifest = copy(views, to, datasets=datasets)
        if as_json:
            m._print_json(manifest)
        console.print(f"[green]archived[/green] {len([v for v in views if v.adapter_path])} version(s) of {model} "
                      f"to {to} ({len(manifest['versions'])} in its manifest, every file verified by sha256)")

    @app.command()
    def gc(model: str,
           keep: Annotated[int, typer.Option("--keep", min=0, help="most recent versions kept, besides every "
                                                                   "active/canary version and their parents")] = 5,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be deleted, delete "
                                                                   "nothing")] = False,
           datasets: Annotated[bool, typer.Option("--datasets/--no-datasets", help="also dataset snapshots only "
                                                                                   "deleted versions used")] = True,
           url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
           as_json: JsonOpt = False) -> None:
        """Delete the artifacts the retention policy no longer keeps (never an active or canary version or a
        parent of one). Archive first (`models archive`)."""
        from retrain.release.retention import RetentionPolicy, plan_retention
        from retrain.release.retention import gc as collect

        views = m._run(m._backend(url, key, direct, config), lambda be: _versions(be, model))
        plan = plan_retention(views, RetentionPolicy(keep_last=keep))
        done = collect(views, plan, dry_run=dry_run, datasets=datasets)
        if as_json:
            m._print_json(plan.as_dict() | {"dry_run": dry_run, "deleted": done})
            return
        for (mod, vid), why in plan.keep.items():
            print(f"keep    {mod}@{vid}: {', '.join(why)}")
        for mod, vid in plan.delete:
            print(f"{'would delete' if dry_run else 'deleted'} {mod}@{vid}")
        for path in done:
            print(f"  {'would remove' if dry_run else 'removed'} {path}")

    @app.command()
    def reproduce(model: str, version: str,
                  base: Annotated[Path | None, typer.Option("--base", help="the base model directory (default: "
                                                                           "resolved from the version)")] = None,
                  work_dir: Annotated[Path | None, typer.Option("--work-dir", help="where to train (default: "
                                                                                   "DATA_DIR/reproduce/...)")] = None,
                  url: UrlOpt = DEFAULT_URL, key: KeyOpt = "", direct: DirectOpt = False, config: ConfigOpt = None,
                  as_json: JsonOpt = False) -> None:
        """Re-run VERSION's recorded recipe on its recorded dataset snapshot and compare the eval figures with the
        recorded ones within the stated tolerances (exit 2 when outside them)."""
        import time

        from retrain.release.reproduce import render_reproduction
        from retrain.release.reproduce import reproduce as rebuild
        from servoloop.settings import load_settings

        settings = load_settings(config)

        async def work(be: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
            v = await be.version(model, version)
            parent = str((v.get("lineage") or {}).get("parent_version") or "")
            pv = await be.version(model, parent) if parent and parent != "base" else None
            return v, pv

        v, parent = m._run(m._backend(url, key, direct, config), work)
        original = _verified_adapter(v, settings)
        current = _verified_adapter(parent, settings) if parent and parent.get("adapter_path") else None
        base_dir = base or m._resolve_base(v["base_model"], settings)
        work_dir = work_dir or settings.data_dir / "reproduce" / model / f"{version}-{int(time.time())}"
        r = rebuild(v, base_dir=base_dir, work_dir=work_dir, current_dir=current, original_dir=original)
        if as_json:
            m._print_json(r.as_dict())
        else:
            print(render_reproduction(r), end="")
        if not r.within_tolerance:
            raise typer.Exit(2)

    @app.command()
    def retire(model: str, version: str, reason: ReasonOpt = "", url: UrlOpt = DEFAULT_URL, key: KeyOpt = "",
               direct: DirectOpt = False, config: ConfigOpt = None, wait: WaitOpt = 30.0) -> None:
        """Decommission VERSION for good. Refused (version_in_use) while a gateway serves it, a tenant pins it,
        canary traffic uses it, or gateways answered with it in the last 15 minutes."""
        m._act("decommission", model, version, reason, 0.0, url, key, direct, config, wait)
