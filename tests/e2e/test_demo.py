"""`servoloop demo --quick` end to end, on the real parts: the loop closes by itself and the poisoned candidate fails.

The whole system as `servoloop up` wires it (gateway with the Transformers engine on the tiny model, the local
Kafka-protocol broker, ingester, monitors, registry, retrain worker in subprocesses) over this session's chDB,
simulated users over HTTP and gRPC. Asserted from the report, whose figures come from the store: a monitor's
trigger led to a trained, gated, canaried and promoted version; held-out users' satisfaction rose by at least
IMPROVEMENT_PP; the poisoned phase's candidate was rejected by the gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.store import Store
from servoloop.demo import DemoPlan, demo_settings, run_demo

# Measured with seed 7 on the quick plan: +51.7 to +62.3 points (e.g. 31.8 % -> 92.6 %), the poisoned candidate's
# win-rate 0.21-0.35 against the gate's 0.55. The bound keeps a wide margin under it and stays above the issue's
# acceptance level of 20 points.
IMPROVEMENT_PP = 30.0


@pytest.mark.timeout(1800)  # 3 min on an idle 2-core machine, 8 under a load of 11-15 (the demo gives up at 25)
async def test_quick_demo_closes_the_loop_and_the_gate_rejects_the_poisoned_candidate(
        store: Store, tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = DemoPlan.quick()
    settings = demo_settings(plan, tmp_path / "demo", model_dir=tiny_model_dir)
    report = await run_demo(plan, settings, seed=7, store=store, report_path=tmp_path / "report.json", live=False,
                            screenshot=tmp_path / "dashboard.png")  # not asserted: kept for a look (as tests/browser)
    print("\n" + json.dumps({k: report[k] for k in ("verdict", "wall_s", "satisfaction", "poisoned_reasons")},
                            indent=1, default=str))

    assert report["ok"], report["verdict"]
    events = [(e["event"], e["id"], e["by"]) for e in report["timeline"]]
    promoted = report["promoted"]
    assert [e for e in events if e[0] == "trigger"], events
    assert ("trained (registered)", promoted, "retrain-worker") in events
    assert ("canary", promoted, "retrain-worker") in events  # retrain.auto_canary_share: the system's own step
    assert ("active", promoted, "canary-monitor") in events or any(
        e[0] == "active" and e[1] == promoted for e in events)
    assert ("rejected", report["poisoned"], "eval-gate") in events
    assert any("win-rate" in r for r in report["poisoned_reasons"]), report["poisoned_reasons"]

    sat = report["satisfaction"]
    assert sat["before"]["rated"] >= 30 and sat["after"]["rated"] >= 30
    assert sat["improvement_pp"] >= IMPROVEMENT_PP, sat
    assert report["lineage"]["version_id"] == promoted and report["lineage"]["trigger_id"]
    assert report["lineage"]["feedback"]["count"] > 0
    assert report["traffic"]["http"] > 0 and report["traffic"]["grpc"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["promoted"] == promoted
