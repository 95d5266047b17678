"""Model artifacts (adapter directories) by content: the hash every `ModelEvent` carries, and a verified fetch.

An artifact is a directory tree at a local path or any fsspec URL (`s3://…`, `file://…`). Its identity is
`tree_sha256`: SHA-256 over every file's relative POSIX path and the SHA-256 of its bytes, in sorted path
order, so the same files give the same hash wherever they live. A gateway fetches an adapter into a local
cache named by that hash and refuses to load it unless the bytes it got hash to the announced value.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from schemas.errors import FailedPrecondition, NotFound

_CHUNK = 1 << 20


class ArtifactMismatch(FailedPrecondition):
    """The fetched artifact's bytes do not hash to the value its model event announced."""

    code = "artifact_mismatch"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _hash_entries(entries: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()


def tree_sha256(root: Path | str) -> str:
    """The content hash of a local directory (or of a single file, as a tree of one)."""
    root = Path(root)
    if root.is_file():
        return _hash_entries([(root.name, _file_sha256(root))])
    if not root.is_dir():
        raise NotFound(f"artifact {str(root)!r} does not exist")
    files = [p for p in root.rglob("*") if p.is_file()]
    return _hash_entries((p.relative_to(root).as_posix(), _file_sha256(p)) for p in files)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def fetch_verified(url: str, sha256: str, cache_dir: Path | str) -> Path:
    """A local directory holding the artifact at `url`, whose tree hash is `sha256`.

    Local paths are verified in place; remote URLs are copied (fsspec) into `cache_dir/<sha256>` once, then
    reused. Raises NotFound when nothing is at `url`, ArtifactMismatch when the bytes do not match. Blocking:
    call it from a worker thread.
    """
    if not sha256:
        raise ArtifactMismatch(f"artifact {url!r} has no announced hash; refusing to load it unverified")
    if is_local(url):
        path = _local_path(url)
        got = tree_sha256(path)
        if got != sha256:
            raise ArtifactMismatch(f"artifact {url!r} hashes to {got[:12]}…, expected {sha256[:12]}…")
        return path
    cache = Path(cache_dir) / sha256
    if cache.is_dir() and tree_sha256(cache) == sha256:
        return cache
    import fsspec  # only for remote artifacts

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise NotFound(f"artifact {url!r} does not exist")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=cache_dir))
    try:
        fs.get(root.rstrip("/") + "/", str(staging), recursive=True)
        got = tree_sha256(staging)
        if got != sha256:
            raise ArtifactMismatch(f"artifact {url!r} hashes to {got[:12]}…, expected {sha256[:12]}…")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(staging, cache)
        return cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
