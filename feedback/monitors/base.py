"""The `Monitor` seam and the plain data every monitor shares: windows and group keys.

A monitor reads the store over a current window (and its baseline) and returns one `MonitorResult` per
group it evaluated. It decides `status` from its own statistics (`ok`, `warn`, `alert`,
`insufficient_data`); the runner (feedback/monitors/runner.py) owns what happens next: hysteresis,
cooldown, the final status written, retrain triggers and webhook alerts.

Drift plugs in without the runner depending on it: if `feedback.monitors.drift` exists and exports
`DriftDetector` (a `Monitor`) and `DriftSettings`, the runner runs it for policy entries of `kind: drift`,
with `DriftSettings(**entry.params)`, and keeps the results whose `metric` is the entry's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import msgspec

from feedback.store.base import Store
from schemas.events import MonitorResult

if TYPE_CHECKING:
    from feedback.monitors.policy import MonitorPolicy


class TimeRange(msgspec.Struct, frozen=True):
    """A half-open range `[start_ms, end_ms)` of epoch milliseconds."""

    start_ms: int
    end_ms: int

    @property
    def duration_ms(self) -> int:
        return self.end_ms - self.start_ms


class MonitorWindow(msgspec.Struct, frozen=True):
    """What one evaluation compares: the `current` window against its `baseline` (which precedes it)."""

    current: TimeRange
    baseline: TimeRange

    @property
    def span(self) -> TimeRange:
        """The smallest range holding both windows (what a query must scan)."""
        return TimeRange(min(self.current.start_ms, self.baseline.start_ms),
                         max(self.current.end_ms, self.baseline.end_ms))


class GroupKey(msgspec.Struct, frozen=True, order=True):
    """Who a result is about. Quality monitors group by all four; an empty string means "any"."""

    tenant: str = ""
    model: str = ""
    model_version: str = ""
    canary_arm: str = ""

    def label(self) -> str:
        return "/".join(p or "*" for p in (self.tenant, self.model, self.model_version, self.canary_arm))


def group_of(result: MonitorResult) -> GroupKey:
    """The group a result names: its tenant, model and version, and `canary_arm` from its details."""
    try:
        details = msgspec.json.decode(result.details or "{}")
    except msgspec.DecodeError:
        details = {}
    arm = details.get("canary_arm", "") if isinstance(details, dict) else ""
    return GroupKey(result.tenant, result.model, result.model_version, str(arm or ""))


@runtime_checkable
class Monitor(Protocol):
    """A family of monitors (quality, drift, ...) that evaluates the policy entries of its `kind`.

    `run` returns one MonitorResult per group it evaluated for `policy` (a `MonitorPolicy` whose `kind`
    is this monitor's). Each result names its group (tenant, model, model_version; `canary_arm` in
    `details`), its window (`window_start_ms`/`window_end_ms` = the current window), `value`,
    `threshold`, `sample_size`, and a status from its own statistics; `details` is a JSON object and
    may carry `baseline`, `p_value`, `ci_low`, `ci_high`, `baseline_sample_size` (kept as evidence).
    Raises StoreError/StoreUnavailable from the store; the runner reports and skips a failing monitor.
    """

    kind: str

    async def run(self, store: Store, window: MonitorWindow, policy: MonitorPolicy) -> list[MonitorResult]: ...
