"""Acceptance 2: two tenants with opposite hidden preferences each get an adapter from their own feedback.

Tenant alpha's users prefer concise polite answers; tenant beta's users prefer every other style over them
(the same questions, every preference reversed). One retrain trigger per tenant: the worker trains each on its
own tenant's feedback only, registers a version scoped to that tenant, and the registry promotes it for that
tenant alone. Afterwards each tenant's held-out preference accuracy (how often its adapter ranks the held-out
answers its users chose above the ones they rejected) is above the base model's, each tenant is served its own
adapter, a third tenant still gets the global base, and alpha's adapter is byte-for-byte unchanged by beta's
training and promotion.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from feedback.store import Store, write_events
from retrain.registry import StoreRegistry
from retrain.settings import RetrainSettings
from retrain.tiny.preferences import style_preference_events
from retrain.worker import RetrainWorker
from schemas.artifacts import tree_sha256
from schemas.events import RetrainTrigger
from tests.gateway.conftest import RunningGateway
from tests.tenancy.conftest import DAY, MODEL, T0, served_version

PAIRS = 160  # per tenant: ~144 training pairs after the time-split hold-out, 16 held out


def _recipe(path: Path) -> str:
    path.write_text(yaml.safe_dump({  # a short run; the gate's bounds loose: this test measures, it does not gate
        "method": "dpo", "epochs": 1, "batch_size": 16, "learning_rate": 0.002, "max_length": 32,
        "loss_type": ["sigmoid", "sft"], "gate": {"min_preference_accuracy": 0.0, "min_accuracy_gain": -1.0,
                                                   "min_win_rate": 0.0, "max_safety_regression": 100,
                                                   "max_perplexity_ratio": 100.0, "eval_pairs": 16, "win_prompts": 2,
                                                   "max_new_tokens": 4,
                                                   "win_samples": 1}}))
    return str(path)


async def test_two_tenants_with_opposite_preferences_each_improve_with_their_own_adapter_only(
        serving: RunningGateway, store: Store, tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "recipe.yaml")
    triggers = {}
    for tenant, reverse, seed in (("alpha", False, 3), ("beta", True, 3)):
        inferences, feedback = style_preference_events(PAIRS, tenant=tenant, model=MODEL, start_ms=T0, seed=seed,
                                                       reverse=reverse)
        triggers[tenant] = RetrainTrigger(tenant=tenant, model=MODEL, model_version="base", method="dpo",
                                          reason=f"{tenant} satisfaction gap", window_start_ms=T0,
                                          window_end_ms=T0 + DAY, actor="monitor:quality",
                                          params=json.dumps({"recipe": recipe}))
        await write_events(store, [*inferences, *feedback, triggers[tenant]])
    keys = {t: serving.key(tenant=t) for t in ("alpha", "beta", "gamma")}

    registry = StoreRegistry(store, tmp_path / "artifacts")
    worker = RetrainWorker(store, registry, RetrainSettings(work_dir=tmp_path / "work", use_embeddings=False,
                                                            base_models={MODEL: str(tiny_model_dir)}))
    alpha = await worker.handle(triggers["alpha"])
    assert alpha.outcome == "registered", alpha
    await registry.promote(MODEL, alpha.version_id, actor="ops", reason="alpha's own adapter")
    alpha_view = await registry.get(MODEL, alpha.version_id)
    alpha_dir = Path(alpha_view.adapter_path)
    alpha_tree = tree_sha256(alpha_dir)
    assert alpha_tree == alpha_view.artifact_sha256
    assert await served_version(serving, keys["alpha"], alpha.version_id) == alpha.version_id

    beta = await worker.handle(triggers["beta"])
    assert beta.outcome == "registered", beta
    await registry.promote(MODEL, beta.version_id, actor="ops", reason="beta's own adapter")

    # each tenant's held-out preference rises over the base model's (the parent both were measured against)
    for outcome in (alpha, beta):
        ev = outcome.eval
        print(f"\n{outcome.dataset['tenant']}: held-out preference accuracy (DPO implicit reward vs the base) "
              f"base {ev['current_preference_accuracy']:.3f} -> adapter {ev['preference_accuracy']:.3f}, mean margin "
              f"{ev['mean_reward_margin']:+.4f} (raw log-prob ranking {ev['current_logp_accuracy']:.3f} -> "
              f"{ev['logp_accuracy']:.3f}); {outcome.wall_s:.1f} s")
        assert ev["preference_accuracy"] > ev["current_preference_accuracy"], ev
        assert ev["preference_accuracy"] >= 0.75 and ev["mean_reward_margin"] > 0, ev

    # scoped: both active at once, each for its own tenant; the global routing untouched; lineage names the tenant
    versions = {v.version_id: v for v in await registry.versions(MODEL)}
    assert versions[alpha.version_id].state == "active" and versions[alpha.version_id].tenant == "alpha"
    assert versions[beta.version_id].state == "active" and versions[beta.version_id].tenant == "beta"
    assert versions["base"].state == "active" and versions["base"].tenant == ""
    for outcome, tenant in ((alpha, "alpha"), (beta, "beta")):
        lineage = versions[outcome.version_id].lineage
        assert lineage["tenant"] == tenant and lineage["dataset"]["tenant"] == tenant
    assert alpha.dataset["sha256"] != beta.dataset["sha256"]

    # alpha's adapter is unchanged: same registered hash, same bytes on disk
    assert (await registry.get(MODEL, alpha.version_id)).artifact_sha256 == alpha_view.artifact_sha256
    assert tree_sha256(alpha_dir) == alpha_tree

    # each tenant is served its own adapter side by side; a tenant without one gets the global version
    assert await served_version(serving, keys["beta"], beta.version_id) == beta.version_id
    assert await served_version(serving, keys["alpha"], alpha.version_id) == alpha.version_id
    assert await served_version(serving, keys["gamma"], "base", tries=1) == "base"
    loaded = set(serving.gw.engines[MODEL].adapter_cache.registered_paths())  # type: ignore[attr-defined]
    assert {alpha.version_id, beta.version_id} <= loaded
