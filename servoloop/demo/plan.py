"""What a demo run does: its size (`DemoPlan`, full or `--quick`), its monitor policy, its DPO recipe, its settings.

The policy and the recipe are the bundled ones cut to demo time: monitor windows of minutes instead of
hours, a satisfaction level (thumbs-up rate) of 60 % below which the `demo` tenant's traffic triggers DPO
retraining, a canary monitor that decides on a few dozen requests and promotes by itself, and a gate that
measures on fewer prompts. Nothing else differs from `servoloop up`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.settings import ModelSettings
from servoloop.settings import Settings

MODEL = "tiny-chat"
TRAIN_TENANT = "demo"
HOLDOUT_TENANT = "demo"  # held-out users share the tenant (its scoped versions serve them), not the training window
SATISFACTION_LEVEL = 0.6  # the demo's service level: the trigger fires below this thumbs-up rate


@dataclass(frozen=True, slots=True)
class DemoPlan:
    """How much traffic each phase plays and how fast the loop decides. `full()` and `quick()` are the presets."""

    name: str
    trainers: int
    holdout: int
    poisoners: int
    drift_after_turns: int  # trainer turns before the prompt mix shifts
    holdout_turns_before: int  # held-out turns on the base model
    holdout_turns_after: int  # held-out turns on the promoted version
    min_samples: int  # thumbs in the satisfaction window before the monitor decides
    canary_min_samples: int
    canary_min_feedback: int
    canary_share: float
    monitor_interval_s: float
    epochs: float
    eval_pairs: int
    win_prompts: int
    win_samples: int
    timeout_s: float  # the whole run; past it the demo stops and reports what it has
    data_window: str = "8m"  # what a retrain trigger's dataset reaches back over (see `policy`)

    @staticmethod
    def full() -> DemoPlan:
        return DemoPlan("full", trainers=40, holdout=20, poisoners=15, drift_after_turns=150,
                        holdout_turns_before=120, holdout_turns_after=120, min_samples=300,
                        canary_min_samples=40, canary_min_feedback=30, canary_share=0.5, monitor_interval_s=5.0,
                        epochs=4.0, eval_pairs=100, win_prompts=48, win_samples=2, timeout_s=2400.0)

    @staticmethod
    def quick() -> DemoPlan:
        # CI size. Fewer thumbs before the first trigger (~90 training pairs; 8 epochs at 2e-3, ~48 steps, as the
        # measured 29 % -> 80 % in `recipe`: 6 epochs reached only +38 points), a 90 s data window (it covers the
        # baseline for the first trigger: 23 s on an idle machine, 60-100 s on a loaded one; the poisoned trigger,
        # 2-5 minutes later, then trains on the poisoned feedback, not the trainers' good baseline pairs: win-rates
        # 0.21 and 0.35 against the 0.55 bound under load, where 2 minutes still reached the baseline on an idle
        # machine: 0.48, 90 s: 0.31; the previous 8 minutes: 0.45-0.53), monitors every 3 s. Seed 7: +51.7 to +62.3
        # points; the test 179 s on an idle machine, 493 s under a load of 11-15 (the previous sizes: 894 s under
        # 15-22).
        return DemoPlan("quick", trainers=16, holdout=10, poisoners=8, drift_after_turns=45,
                        holdout_turns_before=45, holdout_turns_after=45, min_samples=120,
                        canary_min_samples=20, canary_min_feedback=15, canary_share=0.5, monitor_interval_s=3.0,
                        epochs=8.0, eval_pairs=48, win_prompts=24, win_samples=2, timeout_s=1500.0, data_window="90s")

    def scaled(self, users: int | None) -> DemoPlan:
        """The plan with `users` trainers (the other groups in proportion); None keeps it."""
        if not users:
            return self
        from dataclasses import replace

        f = users / self.trainers
        return replace(self, trainers=users, holdout=max(2, round(self.holdout * f)),
                       poisoners=max(2, round(self.poisoners * f)))


def policy(plan: DemoPlan) -> dict[str, Any]:
    """The demo's monitor policy (feedback/monitors/policy.py fields)."""
    return {
        "version": 1,
        "defaults": {"window": {"current": "30m", "baseline": "30m"}, "alpha": 0.05, "cooldown": "30s"},
        "canary": {"enabled": True, "min_samples": plan.canary_min_samples, "min_feedback": plan.canary_min_feedback,
                   "non_inferiority_margin": 0.05, "auto_promote": True, "auto_rollback": True},
        "monitors": [
            # The users' satisfaction below the service level: retrain on their preferences (DPO).
            {"name": "satisfaction_low", "metric": "thumbs_up_rate", "compare": "threshold",
             "threshold": SATISFACTION_LEVEL, "min_samples": plan.min_samples, "tenants": [TRAIN_TENANT],
             # The window reaches back over the baseline phase for the first trigger; the poisoned phase's
             # trigger, minutes later, sees mostly the feedback since the promotion.
             "action": {"type": "retrain", "recipe": "dpo", "data_window": plan.data_window}},
            # The prompt mix moving away from the last minutes' (request features; Evidently report): alert.
            {"name": "request_drift", "kind": "drift", "metric": "dataset_drift", "tenants": [TRAIN_TENANT],
             "window": {"current": "40s", "baseline": "2m"},
             "params": {"embeddings": False, "max_rows": 2000, "min_samples": 40, "reports_kept": 20}},
            {"name": "error_rate_high", "metric": "error_rate", "compare": "threshold", "threshold": 0.05,
             "clear": 0.02, "min_samples": 50},
        ],
    }


def recipe(plan: DemoPlan) -> dict[str, Any]:
    """The demo's DPO recipe: the bundled one (retrain/recipes/dpo.yaml) with a gate sized for the demo."""
    from retrain.recipes import load_recipe

    base = load_recipe("dpo").model_dump(mode="json", exclude={"name"})
    # A few hundred pairs instead of the bundled recipe's thousand: more passes at twice the rate (measured on a
    # demo snapshot of 95 pairs: 8 epochs at 2e-3 took the held-out concise-polite share from 29 % to 80 %;
    # 6 epochs at 1e-3 only to 43 %). The recipe's SFT term keeps the model fluent; the gate checks perplexity.
    base |= {"epochs": plan.epochs, "learning_rate": 0.002, "timeout_s": 900, "save_steps": 1000}
    base["gate"] |= {"min_preference_accuracy": 0.7, "min_accuracy_gain": 0.1, "min_win_rate": 0.55,
                     "max_safety_regression": 2, "max_perplexity_ratio": 1.5, "eval_pairs": plan.eval_pairs,
                     "win_prompts": plan.win_prompts, "win_samples": plan.win_samples}
    return base


def demo_settings(plan: DemoPlan, data_dir: Path, *, model_dir: Path, http_port: int = 0, grpc_port: int = 0,
                  broker: bool = True) -> Settings:
    """The settings tree of a demo run: embedded defaults (the local Kafka-protocol broker unless `broker` is
    False), the demo policy and recipe written under `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    policy_path, recipe_path = data_dir / "demo-policy.yaml", data_dir / "demo-dpo.yaml"
    policy_path.write_text(yaml.safe_dump(policy(plan), sort_keys=False))
    recipe_path.write_text(yaml.safe_dump(recipe(plan), sort_keys=False))
    return Settings(
        data_dir=data_dir, log_level="WARNING",
        gateway={"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
                 "models": [ModelSettings(name=MODEL, engine="transformers", path=str(model_dir),
                                          max_concurrency=4).model_dump()],
                 "hotswap": {"poll_interval_s": 0.5}},
        events={"broker": {"mode": "embedded" if broker else "none"}, "ingest": {"batch_max_wait_s": 0.2}},
        monitors={"policy_path": str(policy_path), "interval_s": plan.monitor_interval_s},
        retrain={"poll_interval_s": 1.0, "recipes": {"dpo": str(recipe_path)}, "use_embeddings": False,
                 "base_models": {MODEL: str(model_dir)}, "min_pairs": 16, "auto_canary_share": plan.canary_share},
        grading={"enabled": False},
    )
