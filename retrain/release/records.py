"""Where a version's release files live: `<artifacts root>/<model>/_release/<version>/`, beside its adapter.

The adapter directory itself is never written after registration (its tree hash is its identity), so the
model card and the export records go to a sibling `_release` folder (a version id cannot start with `_`).
Paths are local directories or any fsspec URL, like the artifact store.
"""

from __future__ import annotations

import json
from typing import Any

from schemas.errors import FailedPrecondition

RELEASE_DIR = "_release"
CARD_FILE = "MODEL_CARD.md"
EXPORTS_DIR = "exports"


def model_root(adapter_path: str) -> str:
    """`<artifacts root>/<model>` from a version's adapter path `<artifacts root>/<model>/<version>`."""
    if not adapter_path:
        raise FailedPrecondition("the version has no adapter path (it is the base model): it has no release files")
    return adapter_path.rstrip("/").rsplit("/", 1)[0]


def release_url(adapter_path: str, version_id: str) -> str:
    return f"{model_root(adapter_path)}/{RELEASE_DIR}/{version_id}"


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return bool(fs.exists(path))


def write_text(url: str, text: str) -> None:
    """Write `text` to `url` (parents created), replacing what was there."""
    fs, path = _fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def read_text(url: str) -> str | None:
    """The text at `url`, or None when there is nothing."""
    fs, path = _fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return f.read()


def write_export_record(adapter_path: str, version_id: str, record: dict[str, Any]) -> str:
    """Store one export's figures as `<release>/exports/<format>.json`; returns its URL."""
    url = f"{release_url(adapter_path, version_id)}/{EXPORTS_DIR}/{record['format']}.json"
    write_text(url, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return url


def export_records(adapter_path: str, version_id: str) -> list[dict[str, Any]]:
    """Every recorded export of a version (sorted by format); empty when none was made."""
    if not adapter_path:
        return []
    fs, root = _fs(f"{release_url(adapter_path, version_id)}/{EXPORTS_DIR}")
    if not fs.exists(root):
        return []
    out = []
    for path in sorted(fs.ls(root, detail=False)):
        if str(path).endswith(".json"):
            with fs.open(path, "r") as f:
                try:
                    out.append(json.loads(f.read()))
                except ValueError:
                    continue
    return out
