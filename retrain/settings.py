"""Settings of the retrain worker (section `retrain` of the settings tree)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class RetrainSettings(BaseModel):
    """How triggers become training jobs: where jobs work, which recipe per method, which base model dirs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    poll_interval_s: float = Field(10.0, gt=0)
    work_dir: Path | None = Field(None, description="datasets and jobs (default: <data_dir>/retrain)")
    recipes: dict[str, str] = Field(default_factory=lambda: {"dpo": "dpo", "sft": "sft"},
                                    description="method -> bundled recipe name or YAML path")
    base_models: dict[str, str] = Field(default_factory=dict,
                                        description="model name -> base model directory (default: the gateway's)")
    default_window_s: float = Field(7 * 86400.0, gt=0, description="feedback window when a trigger names none")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    min_agreement: float = Field(0.75, ge=0.0, le=1.0)
    use_embeddings: bool = True
    train_grace_s: float = Field(60.0, ge=0, description="on top of the recipe timeout before the job is killed")
    min_pairs: int = Field(16, ge=1, description="fewer training records than this: skip, do not train")
    auto_canary_share: float = Field(0.0, ge=0.0, le=1.0, description="share of traffic a candidate that passed "
                                     "the gate gets as a canary at once (0: it waits for an operator); the canary "
                                     "monitor then promotes or rolls it back")
    tenant_min_feedback: int = Field(0, ge=0, description="feedback events a tenant needs in the window before it "
                                     "gets an adapter of its own; below it the tenant's trigger is declined (0: no "
                                     "minimum beyond min_pairs)")
    private_tenants: list[str] = Field(default_factory=list, description="tenants whose feedback trains only their "
                                       "own adapters, never the global model (others' feedback also counts globally)")
