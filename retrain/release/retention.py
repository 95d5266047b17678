"""Retention and archival of version artifacts and dataset snapshots.

Policy (`RetentionPolicy`, pure `plan_retention`): per model, keep forever every `active` or `canary` version
(any tenant's) and, following `lineage.parent_version`, every ancestor of one; keep the `keep_last` most
recently registered versions; the implicit `base` has no artifacts and is never touched. Everything else may
be deleted by `gc` (`servoloop models gc`, `--dry-run` to only print the plan). A dataset snapshot is kept
while any kept version was trained on it.

`archive` copies versions (adapter tree, release files: card and export records, and the dataset snapshot
they were trained on) to any fsspec URL (`file://…`, `memory://…`, `s3://…`): first it checks each adapter
against its registered hash, then it copies, reads every copied file back to compare sha256 digests, and
writes `manifest.json` (per version: state, registered hash, every file's sha256) at the destination root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain.lifecycle import ModelVersion
from retrain.registry import BASE_VERSION
from retrain.release.records import release_url
from schemas.artifacts import ArtifactMismatch, tree_sha256
from schemas.errors import InvalidRequest

MANIFEST = "manifest.json"
PROTECTED = frozenset({"active", "canary"})


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    keep_last: int = 5  # most recently registered versions kept per model, whatever their state

    def __post_init__(self) -> None:
        if self.keep_last < 0:
            raise InvalidRequest(f"keep_last must be >= 0 (got {self.keep_last})", param="keep")


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """Per version (model, version_id): kept with the reasons, or to delete."""

    keep: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    delete: list[tuple[str, str]] = field(default_factory=list)
    keep_datasets: list[str] = field(default_factory=list)
    delete_datasets: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"keep": [{"model": m, "version_id": v, "reasons": r} for (m, v), r in self.keep.items()],
                "delete": [{"model": m, "version_id": v} for m, v in self.delete],
                "keep_datasets": self.keep_datasets, "delete_datasets": self.delete_datasets}


def _dataset_path(v: ModelVersion) -> str:
    d = v.lineage.get("dataset")
    return str(d.get("path") or "") if isinstance(d, dict) else ""


def plan_retention(versions: Sequence[ModelVersion], policy: RetentionPolicy) -> RetentionPlan:
    """Which versions (with artifacts) to keep and why, and which may go. Pure; never deletes an active or
    canary version or any ancestor of one."""
    keep: dict[tuple[str, str], list[str]] = {}
    delete: list[tuple[str, str]] = []
    by_model: dict[str, list[ModelVersion]] = {}
    for v in versions:
        if v.version_id != BASE_VERSION and v.adapter_path:
            by_model.setdefault(v.model, []).append(v)
    for model, vs in by_model.items():
        index = {v.version_id: v for v in vs}
        reasons: dict[str, list[str]] = {}
        for v in vs:
            if v.state in PROTECTED:
                scope = f" (tenant {v.tenant})" if getattr(v, "tenant", "") else ""
                reasons.setdefault(v.version_id, []).append(f"{v.state}{scope}")
                parent, seen = str(v.lineage.get("parent_version") or ""), {v.version_id}
                while parent and parent in index and parent not in seen:
                    reasons.setdefault(parent, []).append(f"ancestor of {v.state} {v.version_id}")
                    seen.add(parent)
                    parent = str(index[parent].lineage.get("parent_version") or "")
        registered = sorted(vs, key=lambda v: (int(v.lineage.get("registered_ms") or 0), v.version_id), reverse=True)
        for v in registered[:policy.keep_last]:
            reasons.setdefault(v.version_id, []).append(f"among the {policy.keep_last} most recent")
        for v in vs:
            if v.version_id in reasons:
                keep[(model, v.version_id)] = reasons[v.version_id]
            else:
                delete.append((model, v.version_id))
    kept_data = {_dataset_path(v) for v in versions if (v.model, v.version_id) in keep} - {""}
    gone_data = {_dataset_path(v) for v in versions if (v.model, v.version_id) in delete} - {""} - kept_data
    return RetentionPlan(keep, delete, sorted(kept_data), sorted(gone_data))


# --- file copies with checksums (fsspec) ------------------------------------------------------------------


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def _files(url: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `url` (empty when nothing is there)."""
    fs, root = _fs(url)
    if not fs.exists(root):
        return {}
    root = root.rstrip("/")
    out = {}
    for path in fs.find(root):
        rel = str(path)[len(root):].lstrip("/")
        with fs.open(path, "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def copy_tree_verified(src: str, dest: str) -> dict[str, str]:
    """Copy every file under `src` to `dest` and read the copies back; returns rel path -> sha256.

    Raises ArtifactMismatch when a copy does not hash like its source.
    """
    sfs, sroot = _fs(src)
    dfs, droot = _fs(dest)
    sroot, droot = sroot.rstrip("/"), droot.rstrip("/")
    source = _files(src)
    for rel in source:
        target = f"{droot}/{rel}"
        parent = target.rsplit("/", 1)[0]
        dfs.makedirs(parent, exist_ok=True)
        with sfs.open(f"{sroot}/{rel}", "rb") as fin, dfs.open(target, "wb") as fout:
            fout.write(fin.read())
    copied = _files(dest)
    bad = [rel for rel, digest in source.items() if copied.get(rel) != digest]
    if bad:
        raise ArtifactMismatch(f"archived copies of {src!r} do not match their source: {', '.join(bad[:5])}")
    return source


def archive(versions: Sequence[ModelVersion], to_url: str, *, datasets: bool = True) -> dict[str, Any]:
    """Copy each version's adapter, release files and (when `datasets`) dataset snapshot to `to_url`, verified.

    Layout: `<to>/<model>/<version>/adapter/`, `<to>/<model>/<version>/release/`, `<to>/datasets/<sha256>/`,
    `<to>/manifest.json` (merged with an earlier manifest there). Raises ArtifactMismatch when an adapter no
    longer hashes as registered or a copy differs. Returns the manifest.
    """
    to_url = to_url.rstrip("/")
    previous = _read_manifest(to_url)
    entries = {(e["model"], e["version_id"]): e for e in previous.get("versions", [])}
    data_entries = {d["sha256"]: d for d in previous.get("datasets", [])}
    for v in versions:
        if not v.adapter_path or v.version_id == BASE_VERSION:
            continue
        fs, root = _fs(v.adapter_path)
        if v.artifact_sha256 and fs.exists(root) and (path := _local(v.adapter_path)) is not None:
            got = tree_sha256(path)
            if got != v.artifact_sha256:
                raise ArtifactMismatch(f"{v.model}@{v.version_id}: adapter at {v.adapter_path} hashes to "
                                       f"{got[:12]}…, registered {v.artifact_sha256[:12]}…")
        dest = f"{to_url}/{v.model}/{v.version_id}"
        files = copy_tree_verified(v.adapter_path, f"{dest}/adapter")
        release = copy_tree_verified(release_url(v.adapter_path, v.version_id), f"{dest}/release")
        entry = {"model": v.model, "version_id": v.version_id, "state": v.state, "tenant": getattr(v, "tenant", ""),
                 "artifact_sha256": v.artifact_sha256, "adapter": f"{dest}/adapter", "files": files,
                 "release_files": release}
        d = v.lineage.get("dataset") if isinstance(v.lineage.get("dataset"), dict) else {}
        if datasets and d.get("path") and d.get("sha256"):
            entry["dataset_sha256"] = d["sha256"]
            if d["sha256"] not in data_entries and _fs(str(d["path"]))[0].exists(_fs(str(d["path"]))[1]):
                ddest = f"{to_url}/datasets/{d['sha256']}"
                data_entries[d["sha256"]] = {"sha256": d["sha256"], "source": str(d["path"]), "path": ddest,
                                             "files": copy_tree_verified(str(d["path"]), ddest)}
        entries[(v.model, v.version_id)] = entry
    manifest = {"versions": list(entries.values()), "datasets": list(data_entries.values())}
    fs, root = _fs(to_url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{MANIFEST}", "w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _read_manifest(to_url: str) -> dict[str, Any]:
    fs, root = _fs(f"{to_url}/{MANIFEST}")
    if not fs.exists(root):
        return {}
    with fs.open(root, "r") as f:
        return json.loads(f.read())


def _local(url: str) -> Path | None:
    if "://" not in url:
        return Path(url)
    return Path(url[len("file://"):]) if url.startswith("file://") else None


def gc(versions: Sequence[ModelVersion], plan: RetentionPlan, *, dry_run: bool = True,
       datasets: bool = True) -> list[str]:
    """Delete the artifacts (adapter and release files) of `plan.delete`, and its datasets; returns what was
    (or, with `dry_run`, would be) deleted. Never touches a kept version: the plan guarantees it."""
    index = {(v.model, v.version_id): v for v in versions}
    targets: list[str] = []
    for key in plan.delete:
        v = index[key]
        if v.state in PROTECTED or key in plan.keep:  # defence in depth: the plan never lists these
            continue
        targets += [v.adapter_path, release_url(v.adapter_path, v.version_id)]
    if datasets:
        targets += plan.delete_datasets
    done = []
    for url in targets:
        fs, root = _fs(url)
        if fs.exists(root):
            if not dry_run:
                fs.rm(root, recursive=True)
            done.append(url)
    return done
