"""Release management on the real registry (chDB): model cards, changelog, retention and archival, retirement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.store import Store, write_events
from retrain.lifecycle import IllegalTransition
from retrain.lineage import version_lineage
from retrain.registry import StoreRegistry
from retrain.release.cards import render_card, write_card
from retrain.release.changelog import changelog, render_changelog
from retrain.release.records import export_records, write_export_record
from retrain.release.retention import RetentionPolicy, archive, gc, plan_retention
from retrain.release.retire import VersionInUse, pinned_version_check, retire_version
from retrain.requests import RequestWorker, request_event
from schemas.artifacts import tree_sha256
from schemas.events import InferenceEvent, Message, now_ms

MODEL = "chat"
BASE = "tiny-chat"


def lineage(n: int, parent: str = "base", *, lr: float = 1e-3, acc: float = 0.9) -> dict[str, object]:
    return {
        "parent_version": parent, "trigger_id": f"trig-{n}",
        "recipe": {"name": "dpo", "method": "dpo", "lora": {"r": 8}},
        "hyperparameters": {"method": "dpo", "learning_rate": lr, "epochs": 1, "beta": 0.1, "seed": 0},
        "dataset": {"sha256": f"{n:064x}", "path": f"/data/snap-{n}", "window_start_ms": 1_767_225_600_000 + n,
                    "window_end_ms": 1_767_312_000_000 + n, "tenant": "demo", "query": f"window {n}"},
        "eval": {"passed": True, "reasons": [], "preference_accuracy": acc, "current_preference_accuracy": 0.5,
                 "win_rate": 0.7, "perplexity": 7.0 + n, "perplexity_ratio": 1.01, "safety_findings": 0,
                 "sample_answers": [{"candidate": "x", "current": "y"}]},
    }


@pytest.fixture
def registry(store: Store, tmp_path: Path) -> StoreRegistry:
    return StoreRegistry(store, tmp_path / "artifacts")


async def add(reg: StoreRegistry, adapter: Path, vid: str, **kw: object):
    n = int(vid.lstrip("v"))
    return await reg.register_candidate(model=MODEL, base_model=BASE, adapter_dir=adapter,
                                        lineage=lineage(n, **kw), actor="trainer", version_id=vid)  # type: ignore[arg-type]


# --- model card -------------------------------------------------------------------------------------------


async def test_model_card_matches_the_registry(registry: StoreRegistry, store: Store, tiny_lora: Path):
    await add(registry, tiny_lora, "v1")
    await registry.promote(MODEL, "v1", actor="ops-key", reason="canary looked good",
                           evidence={"grader_toxicity_rate": 0.01, "canary_satisfaction_delta": 0.12})
    v = await version_lineage(store, MODEL, "v1")
    write_export_record(v["adapter_path"], "v1", {
        "format": "int8", "size_bytes": 6_744_709, "load_s": 0.3, "tokens_per_s": 40.0, "perplexity_delta": 0.02,
        "preference_accuracy_delta": 0.0, "preference_agreement": 0.94})
    url, card = write_card(v, export_records(v["adapter_path"], "v1"))
    assert Path(url) == Path(v["adapter_path"]).parent / "_release" / "v1" / "MODEL_CARD.md"
    assert Path(url).read_text() == card == render_card(v, export_records(v["adapter_path"], "v1"))
    lin = v["lineage"]
    for expected in (f"# Model card: {MODEL}@v1", "state **active**", f"| base model | {BASE} |",
                     f"| artifact sha256 | {tree_sha256(tiny_lora)} |", f"| dataset sha256 | {lin['dataset']['sha256']} |",
                     "| window start | 2026-01-01 00:00:00 UTC |", "| method | dpo |", "| learning_rate | 0.001 |",
                     "| preference_accuracy | 0.9 |", "| win_rate | 0.7 |", "Gate reasons: none (passed)",
                     "by ops-key: canary looked good", "| grader_toxicity_rate | 0.01 |",
                     "| canary_satisfaction_delta | 0.12 |", "| int8 | 6744709 | 0.3 | 40 | +0.02 |",
                     "## Intended use", "## Known limitations", "| promoted by | ops-key |"):
        assert expected in card, expected
    assert tree_sha256(v["adapter_path"]) == v["artifact_sha256"]  # the card lives beside, not inside


async def test_card_of_a_rejected_version_says_not_to_serve_it_and_lists_the_gate_reasons(
        registry: StoreRegistry, store: Store, tiny_lora: Path):
    await add(registry, tiny_lora, "v2")
    await registry.reject(MODEL, "v2", reasons=["win-rate 0.4 < 0.55"], actor="eval-gate")
    card = render_card(await version_lineage(store, MODEL, "v2"))
    assert "This version is **rejected**: do not serve it." in card
    assert "Not promoted" in card and "No exports recorded" in card


# --- changelog --------------------------------------------------------------------------------------------


async def test_changelog_between_two_versions_lists_data_recipe_and_metric_changes(
        registry: StoreRegistry, store: Store, tiny_lora: Path):
    await add(registry, tiny_lora, "v1")
    await add(registry, tiny_lora, "v2", parent="v1", lr=5e-4, acc=0.95)
    a, b = await version_lineage(store, MODEL, "v1"), await version_lineage(store, MODEL, "v2")
    c = changelog(a, b)
    data = {r["key"]: r for r in c["data"]}
    assert data["sha256"] == {"key": "sha256", "from": f"{1:064x}", "to": f"{2:064x}"}
    assert set(data) == {"sha256", "path", "window_start_ms", "window_end_ms", "query"}  # tenant unchanged
    assert c["recipe"] == [{"key": "hyperparameters.learning_rate", "from": 1e-3, "to": 5e-4}]
    metrics = {r["key"]: r for r in c["metrics"]}
    assert metrics["preference_accuracy"]["delta"] == pytest.approx(0.05)
    assert metrics["perplexity"]["delta"] == pytest.approx(1.0)
    assert "sample_answers" not in metrics and "win_rate" not in metrics  # unchanged or not a figure
    assert {r["key"] for r in c["lineage"]} == {"parent_version", "trigger_id"}
    text = render_changelog(c)
    assert "chat: v1 (candidate) -> v2 (candidate)" in text
    assert "hyperparameters.learning_rate: 0.001 -> 0.0005" in text and "preference_accuracy: 0.9 -> 0.95  (+0.05)" in text
    same = changelog(a, a)
    assert not same["data"] and not same["recipe"] and not same["metrics"]
    assert "data: unchanged" in render_changelog(same)


# --- retention and archival -------------------------------------------------------------------------------


async def _history(reg: StoreRegistry, adapter: Path) -> None:
    """v1 <- v2 <- v3 (active, trained from v2); v4 rejected; v5 canary (parent v3); v6, v7 candidates."""
    await add(reg, adapter, "v1")
    await add(reg, adapter, "v2", parent="v1")
    await add(reg, adapter, "v3", parent="v2")
    await reg.promote(MODEL, "v3", actor="t")
    await add(reg, adapter, "v4", parent="v3")
    await reg.reject(MODEL, "v4", reasons=["bad"], actor="t")
    await add(reg, adapter, "v5", parent="v3")
    await reg.start_canary(MODEL, "v5", share=0.2, actor="t")
    await add(reg, adapter, "v6", parent="v3")
    await add(reg, adapter, "v7", parent="v3")


async def test_retention_never_deletes_an_active_or_canary_version_or_a_parent(registry: StoreRegistry,
                                                                              tiny_lora: Path):
    await _history(registry, tiny_lora)
    versions = await registry.versions(MODEL)
    plan = plan_retention(versions, RetentionPolicy(keep_last=0))
    kept = {v for (_, v) in plan.keep}
    assert kept == {"v1", "v2", "v3", "v5"}  # active, canary, and the whole parent chain of both
    assert plan.keep[(MODEL, "v3")] == ["active", "ancestor of canary v5"]
    assert plan.keep[(MODEL, "v1")] == ["ancestor of active v3", "ancestor of canary v5"]
    assert sorted(v for (_, v) in plan.delete) == ["v4", "v6", "v7"]
    plan2 = plan_retention(versions, RetentionPolicy(keep_last=2))
    assert sorted(v for (_, v) in plan2.delete) == ["v4"]  # v6, v7 are the two most recent
    assert "/data/snap-4" in plan2.delete_datasets and "/data/snap-3" in plan2.keep_datasets

    dry = gc(versions, plan, dry_run=True, datasets=False)
    assert len(dry) == 3 and all(Path(p).exists() for p in dry)  # dry run: nothing deleted
    done = gc(versions, plan, dry_run=False, datasets=False)
    assert done == dry and not any(Path(p).exists() for p in done)
    for v in versions:
        if v.version_id in kept:
            assert tree_sha256(v.adapter_path) == v.artifact_sha256  # untouched
    with pytest.raises(Exception, match="keep_last"):
        RetentionPolicy(keep_last=-1)


@pytest.mark.parametrize("scheme", ["file", "memory"])
async def test_archive_copies_artifacts_checksummed_to_any_fsspec_url(registry: StoreRegistry, store: Store,
                                                                     tiny_lora: Path, tmp_path: Path, scheme: str):
    import fsspec

    await add(registry, tiny_lora, "v1")
    await registry.promote(MODEL, "v1", actor="t")
    v = await version_lineage(store, MODEL, "v1")
    write_card(v)
    to = f"file://{tmp_path / 'archive'}" if scheme == "file" else f"memory://archive-{tmp_path.name}"
    manifest = archive(await registry.versions(MODEL), to)
    (entry,) = manifest["versions"]
    assert entry["version_id"] == "v1" and entry["state"] == "active"
    assert entry["artifact_sha256"] == tree_sha256(tiny_lora)
    assert set(entry["files"]) == {p.name for p in tiny_lora.iterdir()}
    assert "MODEL_CARD.md" in entry["release_files"]
    fs, root = fsspec.core.url_to_fs(to)
    with fs.open(f"{root}/chat/v1/adapter/adapter_model.safetensors", "rb") as f:
        assert f.read() == (tiny_lora / "adapter_model.safetensors").read_bytes()
    with fs.open(f"{root}/manifest.json") as f:
        assert json.loads(f.read())["versions"][0]["files"] == entry["files"]
    # an adapter that no longer hashes as registered is not archived as if it were good
    (Path(v["adapter_path"]) / "adapter_config.json").write_text("{}")
    with pytest.raises(Exception, match="hashes to"):
        archive(await registry.versions(MODEL), to)


# --- retirement -------------------------------------------------------------------------------------------


async def test_retire_is_refused_while_served_in_canary_pinned_or_recently_used(registry: StoreRegistry,
                                                                               store: Store, tiny_lora: Path):
    await add(registry, tiny_lora, "v1")
    await registry.promote(MODEL, "v1", actor="t")
    await add(registry, tiny_lora, "v2")
    await registry.start_canary(MODEL, "v2", share=0.25, actor="t")
    await add(registry, tiny_lora, "v3")
    tenant_v = await registry.register_candidate(model=MODEL, base_model=BASE, adapter_dir=tiny_lora,
                                                 lineage=lineage(8), actor="t", version_id="v8", tenant="acme")
    await registry.promote(MODEL, tenant_v.version_id, actor="t")  # tenant acme pins v8

    with pytest.raises(VersionInUse) as e:
        await retire_version(registry, MODEL, "v1", actor="ops")
    assert e.value.code == "version_in_use" and "active version of the global scope" in e.value.message
    with pytest.raises(VersionInUse) as e:
        await retire_version(registry, MODEL, "v2", actor="ops")
    assert "canary traffic uses it (25%" in e.value.message
    with pytest.raises(VersionInUse) as e:
        await retire_version(registry, MODEL, "v8", actor="ops")
    assert "tenant 'acme' pins it" in e.value.message

    # v3: a candidate nobody routes to, but a gateway answered with it a minute ago (e.g. not caught up yet)
    await write_events(store, [InferenceEvent(ts_ms=now_ms() - 60_000, tenant="demo", model=MODEL, model_version="v3",
                                              messages=(Message("user", "hi"),), response="hello")])
    with pytest.raises(VersionInUse) as e:
        await retire_version(registry, MODEL, "v3", actor="ops")
    assert "answered 1 request(s) with it in the last 900 s" in e.value.message and "tenants: demo" in e.value.message
    assert (await registry.get(MODEL, "v3")).state == "candidate"  # nothing written
    v = await retire_version(registry, MODEL, "v3", actor="ops", serving_window_s=30)
    assert v.state == "decommissioned"
    with pytest.raises(IllegalTransition):
        await retire_version(registry, MODEL, "v3", actor="ops", serving_window_s=30)


async def test_retire_request_through_the_worker_and_pinned_clients_get_the_successor(registry: StoreRegistry,
                                                                                      store: Store, tiny_lora: Path):
    await add(registry, tiny_lora, "v1")
    await registry.promote(MODEL, "v1", actor="t")
    await add(registry, tiny_lora, "v2")
    await registry.promote(MODEL, "v2", actor="t")  # v1 retired, superseded by v2
    assert await pinned_version_check(store, MODEL, "v2") is None
    err = await pinned_version_check(store, MODEL, "v1")
    assert err is not None and err.code == "version_retired" and err.details["successor"] == "v2"
    assert "use its successor 'v2'" in err.message

    worker = RequestWorker(registry)
    refused = await worker.apply(request_event(model=MODEL, version_id="v2", action="decommission", actor="ops"))
    assert not refused.applied and "gateways serve it" in refused.message
    done = await worker.apply(request_event(model=MODEL, version_id="v1", action="decommission", actor="ops",
                                            reason="old"))
    assert done.applied and done.state == "decommissioned"
    err = await pinned_version_check(store, MODEL, "v1")
    assert err is not None and "is decommissioned" in err.message and err.details["successor"] == "v2"
