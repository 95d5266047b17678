"""Quality and drift monitors: windows over the store, significance, policies, results and retrain triggers.

    policy = load_policy(settings.monitors.policy_path)         # YAML, validated (None: the bundled one)
    report = await run_cycle(store, policy, now_ms=now, publish=store_publisher(store))
    scheduler = Scheduler(store, settings.monitors, sink_publisher(pipeline.sink))
    await scheduler.start(); ...; await scheduler.aclose()

A drift module plugs in as a `Monitor` (feedback/monitors/base.py) for policy entries of `kind: drift`.
Names are imported on first use: the settings tree imports `feedback.monitors.settings` without pulling
in scipy, httpx and the store.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GroupKey": "base", "Monitor": "base", "MonitorWindow": "base", "TimeRange": "base", "group_of": "base",
    "MonitorPolicy": "policy", "PolicyFile": "policy", "PolicyReloader": "policy", "load_policy": "policy",
    "parse_policy": "policy", "CycleReport": "runner", "Publish": "runner", "Scheduler": "runner",
    "default_monitors": "runner", "run_cycle": "runner", "sink_publisher": "runner", "store_publisher": "runner",
    "MonitorSettings": "settings", "CanaryPolicy": "policy", "ArmStats": "canary_decision",
    "CanaryDecision": "canary_decision", "decide_canary": "canary_decision", "run_canary": "canary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"feedback.monitors.{_EXPORTS[name]}"), name)
