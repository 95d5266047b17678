"""Settings of the monitors (`monitors:` in the settings tree): policy file, cadence, webhook, prices."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class PriceSettings(BaseModel):
    """Price per 1,000 tokens of one model (any currency unit, used only for `cost_per_1k_tokens`)."""

    input_per_1k: float = Field(0.0, ge=0)
    output_per_1k: float = Field(0.0, ge=0)


class WebhookSettings(BaseModel):
    """Where alerts go: one JSON POST per fire or resolve, retried with capped exponential backoff."""

    url: str = Field("", description="empty: no webhook")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with every POST (e.g. auth)")
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(4, ge=0, le=20, description="retries after the first attempt")
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(10.0, ge=0)


class MonitorSettings(BaseModel):
    enabled: bool = Field(True, description="run the scheduler inside `servoloop up`")
    policy_path: Path | None = Field(None, description="YAML monitor policy; default: the bundled one")
    interval_s: float = Field(300.0, gt=0, description="time between cycles (also the look count for Bonferroni)")
    reload_interval_s: float = Field(5.0, gt=0, description="how often the policy file is checked for edits")
    report_dir: Path | None = Field(None, description="HTML reports of drift runs; default: <data_dir>/monitor-reports")
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    prices: dict[str, PriceSettings] = Field(
        default_factory=dict, description="by model name; '*' is the fallback for unlisted models")
