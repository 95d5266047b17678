"""Quality and drift monitors: windows over the store, significance, policies, results and retrain triggers.

    policy = load_policy(settings.monitors.policy_path)         # YAML, validated (default: bundled)
    report = await run_cycle(store, policy, now_ms=now, publish=store_publisher(store))
    scheduler = Scheduler(store, settings.monitors, sink_publisher(pipeline.sink)); await scheduler.start()

A drift module plugs in as a `Monitor` (feedback/monitors/base.py) for policy entries of `kind: drift`.
"""

from __future__ import annotations

from feedback.monitors.base import GroupKey, Monitor, MonitorWindow, TimeRange, group_of

__all__ = ["GroupKey", "Monitor", "MonitorWindow", "TimeRange", "group_of"]
