"""Artifact identity by content and the verified fetch every gateway does before loading an adapter."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from schemas.artifacts import ArtifactMismatch, fetch_verified, tree_sha256
from schemas.errors import NotFound


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 10)
    return root


def test_the_hash_depends_on_paths_and_bytes_not_on_location(tmp_path: Path) -> None:
    a, b = make_tree(tmp_path / "a"), make_tree(tmp_path / "b")
    assert tree_sha256(a) == tree_sha256(b)
    (b / "sub" / "weights.bin").write_bytes(b"changed")
    assert tree_sha256(a) != tree_sha256(b)
    c = make_tree(tmp_path / "c")
    (c / "sub" / "weights.bin").rename(c / "weights.bin")  # same bytes, another path
    assert tree_sha256(a) != tree_sha256(c)


def test_local_artifacts_are_verified_in_place(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "adapter")
    digest = tree_sha256(tree)
    assert fetch_verified(str(tree), digest, tmp_path / "cache") == tree
    assert fetch_verified(f"file://{tree}", digest, tmp_path / "cache") == tree
    (tree / "adapter_config.json").write_text('{"r": 16}')  # tampered after registration
    with pytest.raises(ArtifactMismatch, match="expected"):
        fetch_verified(str(tree), digest, tmp_path / "cache")
    with pytest.raises(ArtifactMismatch, match="unverified"):
        fetch_verified(str(tree), "", tmp_path / "cache")
    with pytest.raises(NotFound):
        fetch_verified(str(tmp_path / "missing"), digest, tmp_path / "cache")


def test_remote_artifacts_are_copied_once_into_a_cache_named_by_their_hash(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "adapter")
    digest = tree_sha256(tree)
    fs = fsspec.filesystem("memory")
    fs.put(f"{tree}/", "/artifacts/v1/", recursive=True)
    got = fetch_verified("memory://artifacts/v1", digest, tmp_path / "cache")
    assert got == tmp_path / "cache" / digest and tree_sha256(got) == digest
    fs.rm("/artifacts/v1", recursive=True)  # the cached copy is reused
    assert fetch_verified("memory://artifacts/v1", digest, tmp_path / "cache") == got
    fs.put(f"{tree}/", "/artifacts/v2/", recursive=True)
    fs.pipe("/artifacts/v2/sub/weights.bin", b"evil")
    with pytest.raises(ArtifactMismatch):
        fetch_verified("memory://artifacts/v2", "f" * 64, tmp_path / "cache")
    assert not (tmp_path / "cache" / ("f" * 64)).exists()
    with pytest.raises(NotFound):
        fetch_verified("memory://artifacts/none", "e" * 64, tmp_path / "cache")
