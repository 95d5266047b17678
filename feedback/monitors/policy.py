"""Monitor policies: YAML in, validated at load (errors name the file and the field), hot-reloaded.

    version: 1
    defaults: {window: {current: 1h, baseline: 24h}, min_samples: 100, alpha: 0.05, cooldown: 6h}
    monitors:
      - name: satisfaction_drop
        metric: thumbs_up_rate         # feedback/monitors/quality.py METRICS (kind: quality)
        compare: baseline              # current window vs the baseline window before it; or `threshold`
        threshold: 0.05                # fire when 5 points worse (and significant)...
        clear: 0.02                    # ...and stay alerting until less than 2 points worse
        action: {type: retrain, recipe: dpo, data_window: 7d}

Durations are seconds or strings like `90s`, `15m`, `1h`, `7d`. Every key under `defaults` is a default
for every monitor entry; an entry's own keys win.

An optional `canary:` section (`CanaryPolicy`) sets how the canary monitor (feedback/monitors/canary.py)
compares a canary version with the active one and whether it may request promotion or rollback itself.
A file without it gets the defaults.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from feedback.monitors.base import MonitorWindow, TimeRange
from feedback.monitors.quality import METRICS
from schemas.errors import ConfigError

log = logging.getLogger(__name__)

BUNDLED = "<bundled default monitor policy>"
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def _to_ms(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '15m', '1h', '7d'")
    if isinstance(value, int | float):
        return int(value * 1000)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use seconds or '90s', '15m', '1h', '7d')")
    return int(float(match.group(1)) * _UNITS[match.group(2) or "s"])


DurationMs = Annotated[int, BeforeValidator(_to_ms), Field(ge=0)]
"""A duration, given in seconds or as '15m'/'1h'/'7d', held in milliseconds."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowSpec(_Strict):
    """The current window ends now; the baseline window ends `gap` before the current one starts."""

    current: DurationMs = 3_600_000
    baseline: DurationMs = 86_400_000
    gap: DurationMs = 0

    @model_validator(mode="after")
    def _positive(self) -> WindowSpec:
        if self.current <= 0 or self.baseline <= 0:
            raise ValueError("window.current and window.baseline must be longer than 0")
        return self

    def at(self, now_ms: int) -> MonitorWindow:
        current = TimeRange(now_ms - self.current, now_ms)
        base_end = current.start_ms - self.gap
        return MonitorWindow(current, TimeRange(base_end - self.baseline, base_end))


class ActionSpec(_Strict):
    """`alert`: notify only. `retrain`: also emit one RetrainTrigger (recipe, over the last `data_window`)."""

    type: Literal["alert", "retrain"] = "alert"
    recipe: Literal["dpo", "sft"] = "dpo"
    data_window: DurationMs = 7 * 86_400_000
    notify: bool = Field(True, description="send fire/resolve notifications to the webhook")


class MonitorPolicy(_Strict):
    """One monitor: what to measure, against what, when it fires and clears, and what firing does.

    Monitors of other kinds (`drift`) decide by the status of their own results for `metric`
    (`alert` opens an incident, `ok` clears it) and take their settings from `params`.

    `threshold` is the fire level. With `compare: baseline` it is the deterioration from the baseline
    (absolute, or a fraction of the baseline with `relative: true`); with `compare: threshold` it is the
    metric's own value. `clear` (the hysteresis level) defaults to half the threshold for baseline
    comparisons and to the threshold itself otherwise. `worse` defaults to the metric's bad direction.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    kind: str = Field("quality", pattern=r"^[a-z_]{1,32}$")
    metric: str = Field(min_length=1, max_length=64)
    compare: Literal["baseline", "threshold"] = "baseline"
    worse: Literal["increase", "decrease"] | None = None
    threshold: float = Field(0.0, description="required for quality monitors; others decide by their own status")
    clear: float | None = None
    relative: bool = False
    min_samples: int = Field(100, ge=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    correction: Literal["bonferroni", "none"] = "bonferroni"
    confidence: float = Field(0.95, gt=0, lt=1)
    cooldown: DurationMs = 6 * 3_600_000
    window: WindowSpec = Field(default_factory=WindowSpec)
    action: ActionSpec = Field(default_factory=ActionSpec)
    tenants: list[str] = Field(default_factory=list, description="only these tenants (empty: all)")
    models: list[str] = Field(default_factory=list, description="only these models (empty: all)")
    enabled: bool = True
    params: dict[str, Any] = Field(default_factory=dict, description="free-form, for the monitor of `kind`")

    @model_validator(mode="after")
    def _consistent(self) -> MonitorPolicy:
        if self.kind == "quality":
            if "threshold" not in self.model_fields_set:
                raise ValueError("a quality monitor needs a threshold")
            if self.metric not in METRICS:
                raise ValueError(f"unknown quality metric {self.metric!r}; one of {sorted(METRICS)}")
            if self.worse is None:
                object.__setattr__(self, "worse", METRICS[self.metric].worse)
        if self.kind == "grade":
            # Imported here: grades imports evaluate, which imports this module.
            from feedback.monitors.grades import grade_metric

            grade_metric(self.metric, self.params)  # raises ValueError naming the metric
        if self.worse is None:
            object.__setattr__(self, "worse", "increase")
        if self.clear is None:
            object.__setattr__(self, "clear", self.threshold / 2 if self.compare == "baseline" else self.threshold)
        assert self.clear is not None
        if self.relative and self.compare != "baseline":
            raise ValueError("relative: true needs compare: baseline (a change relative to the baseline)")
        if self.compare == "baseline" and self.threshold < 0:
            raise ValueError("threshold is a deterioration from the baseline and must be >= 0")
        lower_is_worse = self.compare == "threshold" and self.worse == "decrease"
        if (self.clear < self.threshold) if lower_is_worse else (self.clear > self.threshold):
            raise ValueError(f"clear ({self.clear}) must be on the good side of threshold ({self.threshold})")
        return self

    def applies_to(self, tenant: str, model: str) -> bool:
        return (not self.tenants or tenant in self.tenants) and (not self.models or model in self.models)


class CanaryPolicy(_Strict):
    """Canary vs active: when a canary is decided, and whether the decision is acted on or only recorded.

    `min_samples` requests per arm before any decision; `min_feedback` rated responses per arm (thumbs,
    ratings, or head-to-head preferences between the arms) before a user signal counts. Promotion needs
    every user signal significantly not worse than the active arm by more than its margin
    (`non_inferiority_margin` for rates: thumbs-up and win rate; `rating_margin` in rating units), and
    error and block rates no more than `max_*_increase` above the active arm. Rollback: a user signal worse
    by more than its margin, or an error or block rate above active + its margin, each significant at
    `alpha` (Bonferroni over the checks). With `auto_promote`/`auto_rollback` off the decision is only
    recorded (a MonitorResult), no request is made.
    """

    enabled: bool = True
    min_samples: int = Field(200, ge=1)
    min_feedback: int = Field(100, ge=1)
    non_inferiority_margin: float = Field(0.05, ge=0, lt=1)
    rating_margin: float = Field(0.25, ge=0)
    max_error_rate_increase: float = Field(0.02, ge=0, lt=1)
    max_block_rate_increase: float = Field(0.02, ge=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    auto_promote: bool = True
    auto_rollback: bool = True


class PolicyFile(_Strict):
    version: Literal[1] = 1
    defaults: dict[str, Any] = Field(default_factory=dict)
    monitors: list[MonitorPolicy] = Field(default_factory=list)
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            return data
        unknown = set(defaults) - set(MonitorPolicy.model_fields) - {"name", "metric", "threshold"}
        if unknown:
            raise ValueError(f"defaults: unknown keys {sorted(unknown)}")
        monitors = data.get("monitors")
        if isinstance(monitors, list):
            data = {**data, "monitors": [_merge(defaults, m) if isinstance(m, dict) else m for m in monitors]}
        return data

    @model_validator(mode="after")
    def _unique(self) -> PolicyFile:
        seen: set[str] = set()
        for m in self.monitors:
            if m.name in seen:
                raise ValueError(f"two monitors are named {m.name!r}")
            seen.add(m.name)
        return self

    @property
    def active(self) -> list[MonitorPolicy]:
        return [m for m in self.monitors if m.enabled]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _where(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for p in loc:
        if isinstance(p, int):
            name = node[p].get("name") if isinstance(node, list) and p < len(node) and isinstance(node[p], dict) else None
            parts[-1:] = [f"{parts[-1] if parts else ''}[{p}]" + (f" ({name})" if name else "")]
        else:
            parts.append(str(p))
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "(root)"


def parse_policy(text: str, source: str = BUNDLED) -> PolicyFile:
    """Parse and validate a policy. Raises ConfigError naming `source` and each offending field."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"monitor policy {source} is not valid YAML: {e}", details={"file": source}) from e
    if not isinstance(data, dict):
        raise ConfigError(f"monitor policy {source} must hold a mapping at the top level", details={"file": source})
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{_where(tuple(err['loc']), data)}: {err['msg'].removeprefix('Value error, ')}"
                             for err in e.errors())
        raise ConfigError(f"invalid monitor policy {source}: {problems}",
                          details={"file": source, "errors": [list(map(str, err["loc"])) for err in e.errors()]}) from e


def bundled_policy_text() -> str:
    return resources.files("feedback.monitors").joinpath("default_policy.yaml").read_text()


def load_policy(path: Path | str | None = None) -> PolicyFile:
    """The policy at `path`, or the bundled default when None. Raises ConfigError (file and field named)."""
    if path is None:
        return parse_policy(bundled_policy_text(), BUNDLED)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read monitor policy {path}: {e.strerror or e}", details={"file": str(path)}) from e
    return parse_policy(text, str(path))


class PolicyReloader:
    """Holds the current policy of one file (or the bundled one); `poll()` or the `run()` task picks up edits.

    The first load raises ConfigError, so a bad file stops start-up; a later bad edit keeps the last good
    policy and sets `last_error`. Read the policy with `reloader.current` (an attribute read).
    """

    def __init__(self, path: Path | str | None, *, interval_s: float = 5.0,
                 on_reload: Callable[[PolicyFile], None] | None = None):
        self.path = Path(path) if path is not None else None
        self.interval_s = interval_s
        self.on_reload = on_reload
        self.last_error: ConfigError | None = None
        self.generation = 0
        self._stamp = self._stat()
        text = self._read()
        self._digest = hashlib.sha256(text.encode()).hexdigest()
        self.current: PolicyFile = parse_policy(text, str(self.path) if self.path else BUNDLED)

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> str:
        if self.path is None:
            return bundled_policy_text()
        try:
            return self.path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read monitor policy {self.path}: {e.strerror or e}",
                              details={"file": str(self.path)}) from e

    def poll(self) -> bool:
        """Reload if the file changed; True when a new policy took effect. Never raises for a bad file."""
        stamp = self._stat()
        if self.path is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            text = self._read()
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest == self._digest and self.last_error is None:
                return False
            self._digest = digest
            policy = parse_policy(text, str(self.path))
        except ConfigError as e:
            if self.last_error is None or self.last_error.message != e.message:
                log.warning("monitor policy not reloaded, keeping the last good one: %s", e.message)
            self.last_error = e
            return False
        self.current, self.last_error = policy, None
        self.generation += 1
        log.info("monitor policy reloaded from %s (generation %d)", self.path, self.generation)
        if self.on_reload is not None:
            self.on_reload(policy)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `interval_s` until `stop` is set; reading and parsing run in a thread."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
                return
            except TimeoutError:
                await asyncio.to_thread(self.poll)
