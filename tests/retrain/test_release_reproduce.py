"""`models reproduce`: re-running a version's recorded recipe on its recorded snapshot reaches its eval figures."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from feedback.store import Store, write_events
from retrain.lineage import version_lineage
from retrain.registry import StoreRegistry
from retrain.release.reproduce import TOLERANCES, NotReproducible, compare, reproduce
from schemas.artifacts import ArtifactMismatch

T0 = 1_767_225_600_000
MODEL = "tiny-chat"


def tiny_recipe() -> Any:
    """The bundled DPO recipe cut to a few steps and a small gate (CI runs on 2 shared cores)."""
    from retrain.recipes import load_recipe, parse_recipe

    data = load_recipe("dpo").hyperparameters()
    data |= {"name": "dpo-tiny", "batch_size": 32, "epochs": 1.0, "save_steps": 1000, "logging_steps": 1}
    data["gate"] |= {"eval_pairs": 16, "win_prompts": 4, "win_samples": 1, "max_new_tokens": 8}
    return parse_recipe(data)


async def test_reproduce_reaches_the_recorded_eval_figures_within_tolerance(store: Store, tmp_path: Path,
                                                                         tiny_model_dir: Path):
    from retrain.datasets import DatasetFilters, build_snapshot
    from retrain.gate import evaluate
    from retrain.tiny.preferences import style_preference_events
    from retrain.train import train

    inferences, feedback = style_preference_events(64, start_ms=T0)
    await write_events(store, [*inferences, *feedback])
    snapshot = await build_snapshot(store, DatasetFilters(start_ms=T0, end_ms=T0 + 86_400_000, model=MODEL,
                                                          use_embeddings=False), tmp_path / "datasets")
    recipe = tiny_recipe()
    # the original run, as the retrain worker does it: train, gate, register with lineage
    first = train(recipe, snapshot.path, tiny_model_dir, tmp_path / "job", progress=False)
    gate = evaluate(base_dir=tiny_model_dir, candidate_dir=first.adapter_dir, eval_pairs=snapshot.pairs("eval"),
                    thresholds=recipe.gate, beta=recipe.beta, max_length=recipe.max_length, seed=recipe.seed,
                    prompts=[e["prompt"] for e in snapshot.sft("eval")])
    dataset = {"sha256": snapshot.sha256, "path": str(snapshot.path), "window_start_ms": T0,
               "window_end_ms": T0 + 86_400_000}
    registry = StoreRegistry(store, tmp_path / "artifacts")
    await registry.register_candidate(
        model=MODEL, base_model=MODEL, adapter_dir=first.adapter_dir, actor="retrain-worker", version_id="v1",
        lineage={"parent_version": "base", "recipe": {"name": recipe.name, "method": recipe.method},
                 "hyperparameters": recipe.hyperparameters(), "dataset": dataset, "eval": gate.as_dict()})
    v = await version_lineage(store, MODEL, "v1")

    r = reproduce(v, base_dir=tiny_model_dir, work_dir=tmp_path / "again", original_dir=Path(v["adapter_path"]))
    print(f"\nreproduce: {r.wall_s} s, checks {[(c.metric, c.original, c.reproduced) for c in r.checks]}")
    assert r.within_tolerance, r.checks
    assert {c.metric for c in r.checks} == set(TOLERANCES)  # every stated figure was compared
    assert r.dataset_sha256 == snapshot.sha256
    assert r.identical_adapter  # CPU training with the recorded seed is deterministic here

    # figures outside the tolerance fail the comparison
    worse = {**gate.as_dict(), "preference_accuracy": gate.figures["preference_accuracy"] - 0.2}
    assert not all(c.ok for c in compare(worse, r.figures))

    # a snapshot changed after registration is refused, not silently re-trained on
    (snapshot.path / "manifest.json").write_text((snapshot.path / "manifest.json").read_text().replace(
        snapshot.sha256, "0" * 64))
    with pytest.raises(ArtifactMismatch):
        reproduce(v, base_dir=tiny_model_dir, work_dir=tmp_path / "third")
    shutil.rmtree(snapshot.path)
    with pytest.raises(NotReproducible, match="snapshot is gone"):
        reproduce(v, base_dir=tiny_model_dir, work_dir=tmp_path / "fourth")


def test_reproduce_needs_a_recorded_recipe_and_eval_figures(tmp_path: Path, tiny_model_dir: Path):
    v = {"model": MODEL, "version_id": "v9", "lineage": {"dataset": {"path": "/nowhere"}}}
    with pytest.raises(NotReproducible, match="no full recipe"):
        reproduce(v, base_dir=tiny_model_dir, work_dir=tmp_path)
    v["lineage"]["hyperparameters"] = tiny_recipe().hyperparameters()
    with pytest.raises(NotReproducible, match="no eval figures"):
        reproduce(v, base_dir=tiny_model_dir, work_dir=tmp_path)
    checks = compare({"perplexity": 10.0, "win_rate": 0.5}, {"perplexity": 10.4, "win_rate": 0.65})
    assert [(c.metric, c.ok) for c in checks] == [("win_rate", False), ("perplexity", True)]
