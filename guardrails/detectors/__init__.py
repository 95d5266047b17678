"""The detector registry: what a policy may name, its parameters, the sides it runs on and its types."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from guardrails.detectors import canary, injection, limits, lists, pii, secrets
from guardrails.detectors.base import Detector, RuleDetector

__all__ = ["REGISTRY", "Detector", "DetectorSpec", "RuleDetector", "build_detector"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlocklistParams(_Params):
    words: list[str] = Field(default_factory=list, description="whole words, case-insensitive")
    phrases: list[str] = Field(default_factory=list, description="multi-word phrases, case-insensitive")
    regexes: list[str] = Field(default_factory=list, description="bounded regular expressions")
    type: str = Field("BLOCKLIST", pattern=r"^[A-Z][A-Z0-9_]{0,63}$")


class LimitsParams(_Params):
    max_chars: int | None = Field(200_000, ge=1)
    mixed_script: bool = True
    allowed_scripts: list[str] | None = None
    max_foreign_ratio: float = Field(0.2, ge=0.0, le=1.0)


class CanaryParams(_Params):
    canary: str | None = Field(None, min_length=1, max_length=canary.MAX_CANARY_CHARS,
                               description="a fixed canary; the per-request one passed by the gateway wins")


@dataclass(frozen=True)
class DetectorSpec:
    """How to build one detector from its validated parameters, and where it may run."""

    name: str
    params: type[_Params]
    sides: frozenset[str]
    types: frozenset[str] | None  # None: free-form (blocklists name their own)
    build: Callable[[Any], Detector | None]


def _blocklist(p: BlocklistParams) -> Detector:
    return lists.blocklist([*p.words, *p.phrases], p.regexes, p.type)


def _limits(p: LimitsParams) -> Detector:
    return limits.Limits(max_chars=p.max_chars, mixed_script=p.mixed_script, allowed_scripts=p.allowed_scripts,
                         max_foreign_ratio=p.max_foreign_ratio)


def _canary(p: CanaryParams) -> Detector | None:
    return canary.canary_detector(p.canary) if p.canary else None


BOTH = frozenset({"input", "output"})
REGISTRY: dict[str, DetectorSpec] = {
    "pii": DetectorSpec("pii", _Params, BOTH, frozenset(pii.PLACEHOLDER_TYPES),
                        lambda _p: RuleDetector(pii.NAME, pii.VERSION, pii.rules())),
    "secrets": DetectorSpec("secrets", _Params, BOTH, frozenset({
        "PRIVATE_KEY", "API_KEY", "AWS_ACCESS_KEY", "GITHUB_TOKEN", "GITLAB_TOKEN", "SLACK_TOKEN", "SLACK_WEBHOOK",
        "GOOGLE_API_KEY", "STRIPE_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "HUGGINGFACE_TOKEN", "NPM_TOKEN",
        "PYPI_TOKEN", "SENDGRID_KEY", "TWILIO_KEY", "AZURE_STORAGE_KEY", "JWT", "PASSWORD", "SECRET"}),
        lambda _p: RuleDetector(secrets.NAME, secrets.VERSION, secrets.rules())),
    "injection": DetectorSpec("injection", _Params, frozenset({"input"}), frozenset(injection.TYPES),
                              lambda _p: injection.InjectionDetector()),
    "blocklist": DetectorSpec("blocklist", BlocklistParams, BOTH, None, _blocklist),
    "invisible": DetectorSpec("invisible", _Params, BOTH,
                              frozenset({"TAG_CHARACTERS", "INVISIBLE_CHARS", "CONTROL_CHARS"}),
                              lambda _p: limits.invisible()),
    "limits": DetectorSpec("limits", LimitsParams, frozenset({"input"}),
                           frozenset({"LENGTH_EXCEEDED", "MIXED_SCRIPT", "SCRIPT_NOT_ALLOWED"}), _limits),
    "canary": DetectorSpec("canary", CanaryParams, frozenset({"output"}), frozenset({"SYSTEM_PROMPT_LEAK"}),
                           _canary),
}


def build_detector(name: str, params: _Params, cache: dict[tuple[str, str], Detector | None]) -> Detector | None:
    """The detector `name` with `params`, shared through `cache` by every policy built from one file."""
    key = (name, params.model_dump_json())
    if key not in cache:
        cache[key] = REGISTRY[name].build(params)
    return cache[key]
