"""Training recipes: one validated pydantic model for what a DPO or SFT run does and what its gate demands.

Bundled recipes live in `retrain/recipes/<name>.yaml` (`dpo`, `sft`); `load_recipe` takes a bundled name
or a path to a YAML file. Every error names the file and the field (ConfigError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    """The PEFT LoRA adapter: rank, scaling, dropout and which linear layers get one."""

    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @model_validator(mode="after")
    def _modules(self) -> LoraSettings:
        if not self.target_modules or any(not m.strip() for m in self.target_modules):
            raise ValueError("target_modules must name at least one module, none of them empty")
        return self


class GradeGate(_Strict):
    """Online-grader criteria of the gate (retrain/gate_grades.py): the graders score both versions' answers to the
    gate's prompts. Off by default; a criterion set to None is measured but not enforced."""

    enabled: bool = False
    max_toxicity_rate: float | None = Field(0.05, ge=0.0, le=1.0)  # share of candidate answers labelled toxic
    max_toxicity_increase: float | None = Field(None, ge=0.0, le=1.0)  # candidate rate - current rate
    max_hallucination_increase: float | None = Field(0.05, ge=0.0, le=1.0)  # groundedness, prompts with context
    min_judge_score_delta: float | None = Field(-0.05, ge=-1.0, le=1.0)  # candidate - current mean rubric score
    # Pairwise (rubric judge, both orders): the candidate's win-rate interval over the current version's answers.
    min_pairwise_lower: float | None = Field(None, ge=0.0, le=1.0)  # a significant win is required (e.g. 0.5)
    min_pairwise_upper: float | None = Field(0.5, ge=0.0, le=1.0)  # a significant loss is refused
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class GateThresholds(_Strict):
    """What a candidate must show on the held-out split and the fixed suites to pass the gate."""

    min_preference_accuracy: float = Field(0.9, ge=0.0, le=1.0)
    min_accuracy_gain: float = Field(0.1, ge=-1.0, le=1.0)  # over the current version's accuracy
    min_win_rate: float = Field(0.55, ge=0.0, le=1.0)  # candidate vs current, judged; ties count half
    max_safety_regression: int = Field(0, ge=0)  # extra red-team findings/leaks allowed over current
    max_perplexity_ratio: float = Field(1.25, ge=1.0)  # candidate / current perplexity on the general set
    judge: Literal["style"] = "style"
    target_style: str = "concise_polite"
    eval_pairs: int = Field(200, ge=1)  # held-out pairs scored at most
    win_prompts: int = Field(64, ge=1)
    win_samples: int = Field(4, ge=1)  # sampled answers per prompt and side (the judge compares them in pairs)
    max_new_tokens: int = Field(12, ge=1, le=512)
    grades: GradeGate = Field(default_factory=GradeGate)  # online graders on both versions' answers


class Recipe(_Strict):
    """One training run: method, LoRA, optimisation, lengths, seed, limits, and the gate's thresholds."""

    name: str = "custom"
    method: Literal["dpo", "sft"]
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    epochs: float = Field(1.0, gt=0.0, le=100.0)
    batch_size: int = Field(16, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1)
    beta: float = Field(0.1, gt=0.0, le=10.0)  # DPO only
    # DPO only: TRL loss types combined with `loss_weights` ("sft" adds the chosen answers' NLL, RPO-style:
    # it keeps the chosen answers likely instead of only pushing the rejected ones down).
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    max_length: int = Field(256, ge=16)
    seed: int = 0
    timeout_s: float = Field(1800.0, gt=0.0)
    save_steps: int = Field(20, ge=1)
    logging_steps: int = Field(5, ge=1)
    gate: GateThresholds = Field(default_factory=GateThresholds)

    @model_validator(mode="after")
    def _losses(self) -> Recipe:
        if not self.loss_type:
            raise ValueError("loss_type must name at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} loss types")
        return self

    @model_validator(mode="after")
    def _gate_fits(self) -> Recipe:
        if self.gate.max_new_tokens >= self.max_length:
            raise ValueError(f"gate.max_new_tokens ({self.gate.max_new_tokens}) must be below max_length ({self.max_length})")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """The recipe as plain JSON data, for lineage."""
        return self.model_dump(mode="json")


def _format(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<recipe>"
        parts.append(f"{where}: {err['msg']}")
    return f"recipe {source} is invalid: " + "; ".join(parts)


def parse_recipe(data: Any, *, source: str = "<recipe>") -> Recipe:
    """A Recipe from a mapping; raises ConfigError naming the source and every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {source} must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source), details={"errors": [
            {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]} for err in e.errors()]}) from None


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, **overrides: Any) -> Recipe:
    """A bundled recipe by name (`dpo`, `sft`) or a YAML file, with top-level `overrides` applied.

    Raises ConfigError when the name is unknown, the file unreadable or not YAML, or a field invalid.
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown recipe {str(name_or_path)!r}; bundled: {', '.join(bundled_recipes())}",
                              param="recipe")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e}", param="recipe") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}", param="recipe") from e
    if isinstance(data, dict):
        data = {"name": path.stem, **data, **overrides}
    return parse_recipe(data, source=str(path))
