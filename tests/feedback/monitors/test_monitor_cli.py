"""`servoloop monitor`: one cycle from cron against a real embedded store (subprocesses: chDB's one-path rule)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from servoloop.settings import load_settings, redacted

HOUR = 3_600_000
NOW = 1_767_225_600_000 + 25 * HOUR

SEED = textwrap.dedent("""
    import asyncio, random, sys
    from feedback.store import ChdbStore, migrate, write_events
    from schemas.events import FeedbackEvent, InferenceEvent

    async def main():
        store = ChdbStore.open(sys.argv[1], "servoloop")
        await migrate(store)
        rng, events = random.Random(1), []
        for start, n, up in ((NOW - 25 * HOUR, 600, 0.8), (NOW - HOUR, 300, 0.6)):
            for k in range(n):
                i = InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=start + k * 1000)
                events += [i, FeedbackEvent(tenant="acme", target_id=i.event_id, kind="thumbs",
                                            thumbs=k < round(n * up), ts_ms=i.ts_ms + 10)]
        await write_events(store, events)
        await store.aclose()

    HOUR, NOW = %d, %d
    asyncio.run(main())
""") % (HOUR, NOW)


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SERVOLOOP_DATA_DIR": str(data_dir), "SERVOLOOP_EVENTS__BROKER__MODE": "none"}
    env.pop("SERVOLOOP_CONFIG", None)
    return subprocess.run([sys.executable, "-c", "from servoloop.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_monitor_run_records_results_and_one_trigger_and_a_second_run_does_not_fire_again(tmp_path: Path) -> None:
    policy = tmp_path / "monitors.yaml"
    policy.write_text("monitors: [{name: satisfaction_drop, metric: thumbs_up_rate, threshold: 0.05, "
                      "action: {type: retrain, recipe: dpo}}]")
    seeded = subprocess.run([sys.executable, "-c", SEED, str(tmp_path / "chdb")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert seeded.returncode == 0, seeded.stderr

    first = cli(tmp_path, "monitor", "run", "--policy", str(policy), "--now-ms", str(NOW), "--json")
    assert first.returncode == 0, first.stderr
    events = [json.loads(line) for line in first.stdout.splitlines()]
    assert [(e["type"], e.get("status")) for e in events] == [("monitor", "alert"), ("retrain", None)]
    assert "retrain chat@v1 (dpo)" in first.stderr

    second = cli(tmp_path, "monitor", "run", "--policy", str(policy), "--now-ms", str(NOW + 60_000))
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["triggers"] == 0 and summary["statuses"] == {"alert": 1}


def test_monitor_check_lists_the_bundled_policy_and_names_the_field_of_a_bad_one(tmp_path: Path) -> None:
    ok = cli(tmp_path, "monitor", "check")
    assert ok.returncode == 0 and "satisfaction_drop" in ok.stdout and "retrain (dpo)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("monitors: [{name: x, metric: error_rate, threshold: 0.1, cooldown: forever}]")
    refused = cli(tmp_path, "monitor", "check", str(bad))
    assert refused.returncode == 2 and str(bad) in refused.stderr and "cooldown" in refused.stderr
    assert cli(tmp_path, "monitor", "run", "--help").returncode == 0


def test_the_monitors_section_of_the_settings_tree(tmp_path: Path) -> None:
    config = tmp_path / "servoloop.yaml"
    config.write_text("monitors: {interval_s: 60, webhook: {url: 'http://hooks/x', headers: {Authorization: s3cret}}, "
                      "prices: {chat: {input_per_1k: 0.5, output_per_1k: 1.5}}}")
    settings = load_settings(config)
    assert "s3cret" not in str(redacted(settings))
    assert settings.monitors.interval_s == 60 and settings.monitors.webhook.url == "http://hooks/x"
    assert settings.monitors.prices["chat"].output_per_1k == 1.5 and settings.monitors.policy_path is None
