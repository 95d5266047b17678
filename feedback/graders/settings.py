"""Settings of the online graders (`grading:` in the settings tree): which graders, how much traffic, how fast.

    grading:
      interval_s: 10
      graders:
        toxicity: {sample_rate: 0.1, max_per_hour: 20000}
        judge: {sample_rate: 0.05, models: [chat]}

Sampling is by a hash of the inference id (the same inferences are picked by every worker and every
rerun); `max_per_cycle` and `max_per_hour` are the cost budget; `concurrency` bounds graders running at
once (each grader's CPU work runs in a worker thread). The defaults keep up with 200 req/s on one
core (benchmarks/README.md): 10 % toxicity sampling is 72,000 grades an hour.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class GraderSettings(BaseModel):
    """One grader: on or off, its sampling rate and budget, and which traffic it sees."""

    enabled: bool = True
    sample_rate: float = Field(0.1, ge=0, le=1, description="share of inferences graded (by a hash of the id)")
    max_per_cycle: int = Field(2048, ge=1, description="most inferences (or pairs) graded per cycle")
    max_per_hour: int = Field(100_000, ge=0, description="budget: most grades per rolling hour (0 = unlimited)")
    tenants: list[str] = Field(default_factory=list, description="only these tenants (empty: all)")
    models: list[str] = Field(default_factory=list, description="only these models (empty: all)")
    params: dict[str, Any] = Field(default_factory=dict, description="grader-specific (e.g. groundedness similarity)")


def _default_graders() -> dict[str, GraderSettings]:
    return {
        "toxicity": GraderSettings(sample_rate=0.1),
        "groundedness": GraderSettings(sample_rate=0.1),
        "judge": GraderSettings(sample_rate=0.05),
        "judge_pairwise": GraderSettings(sample_rate=0.05, max_per_cycle=256),
    }


class GradeExportSettings(BaseModel):
    """Where grades go besides the store (off by default). Destinations and keys are the gateway's tracing
    settings: `gateway.tracing.endpoint` / `.langfuse` (host, keys)."""

    otel: bool = Field(False, description="each grade as a gen_ai.evaluation.result event on the graded "
                                          "inference's trace, over OTLP (gateway.tracing's destinations)")
    langfuse: bool = Field(False, description="each grade of a traced inference as a Langfuse score "
                                              "(gateway.tracing.langfuse host and keys)")


class GradingSettings(BaseModel):
    enabled: bool = Field(True, description="run the grading worker (inside `servoloop up` once wired, or `servoloop grade run`)")
    interval_s: float = Field(10.0, gt=0, description="time between grading cycles")
    lookback_s: float = Field(3600.0, gt=0, description="how far back ungraded inferences are looked for")
    settle_s: float = Field(2.0, ge=0, description="inferences younger than this wait for the next cycle")
    batch_size: int = Field(64, ge=1, description="inferences per grader call")
    concurrency: int = Field(2, ge=1, description="grader batches running at once")
    graders: dict[str, GraderSettings] = Field(default_factory=_default_graders)
    export: GradeExportSettings = Field(default_factory=GradeExportSettings)
