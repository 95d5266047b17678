"""Monitor policies: the bundled default is valid, bad files are refused naming the file and the field,
edits are picked up and a bad edit keeps the last good policy; and the pure evaluation of one entry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from feedback.monitors.evaluate import evaluate
from feedback.monitors.policy import BUNDLED, PolicyReloader, load_policy, parse_policy
from feedback.monitors.quality import Estimate
from feedback.monitors.stats import Interval, wilson_interval
from schemas.errors import ConfigError

HOUR = 3_600_000


def test_the_bundled_policy_is_valid_and_watches_satisfaction_with_a_retrain_action() -> None:
    policy = load_policy()
    by_name = {m.name: m for m in policy.monitors}
    sat = by_name["satisfaction_drop"]
    assert (sat.metric, sat.worse, sat.action.type, sat.action.recipe) == ("thumbs_up_rate", "decrease", "retrain", "dpo")
    assert sat.window.current == HOUR and sat.window.baseline == 24 * HOUR and sat.cooldown == 24 * HOUR
    assert by_name["error_rate_high"].cooldown == 6 * HOUR  # from `defaults`


def test_defaults_durations_and_the_window_arithmetic() -> None:
    policy = parse_policy("""
defaults: {window: {current: 15m, baseline: 2h, gap: 90}, cooldown: 1d}
monitors:
  - {name: a, metric: error_rate, compare: threshold, threshold: 0.1}
  - {name: b, metric: latency_p95_ms, relative: true, threshold: 0.5, window: {current: 30m}}
""")
    a, b = policy.monitors
    assert a.cooldown == 86_400_000 and a.clear == 0.1 and b.clear == 0.25
    w = a.window.at(10 * HOUR)
    assert (w.current.start_ms, w.current.end_ms) == (10 * HOUR - 15 * 60_000, 10 * HOUR)
    assert w.baseline.end_ms == w.current.start_ms - 90_000 and w.baseline.duration_ms == 2 * HOUR
    assert b.window.current == 30 * 60_000 and b.window.baseline == 2 * HOUR  # merged key by key


@pytest.mark.parametrize(("text", "message"), [
    ("monitors: [{name: a, metric: thumbs, threshold: 1}]", "monitors[0] (a): unknown quality metric 'thumbs'"),
    ("monitors: [{name: a, metric: error_rate, threshold: high}]", "monitors[0] (a).threshold: Input should be a valid number"),
    ("monitors: [{name: a, metric: error_rate}]", "monitors[0] (a): a quality monitor needs a threshold"),
    ("monitors: [{name: a, metric: error_rate, threshold: 0.1, cooldown: soon}]", "monitors[0] (a).cooldown: not a duration"),
    ("monitors: [{name: a, metric: error_rate, threshold: 0.1, clear: 0.2}]", "clear (0.2) must be on the good side"),
    ("monitors: [{name: a, metric: error_rate, threshold: 0.1, action: {type: page}}]", "monitors[0] (a).action.type"),
    ("monitors: [{name: a, metric: error_rate, threshold: 0.1, action: {type: retrain, recipe: ppo}}]",
     "monitors[0] (a).action.recipe"),
    ("monitors: [{name: a, metric: error_rate, threshold: 0.1, alpha: 2}]", "monitors[0] (a).alpha"),
    ("monitors: [{name: a, metric: error_rate, compare: threshold, relative: true, threshold: 0.1}]",
     "relative: true needs compare: baseline"),
    ("monitors: [{name: a, metric: error_rate, threshold: 0.1, tresh: 1}]", "monitors[0] (a).tresh: Extra inputs"),
    ("monitors: [{name: a, metric: error_rate, threshold: 0.1}, {name: a, metric: error_rate, threshold: 0.2}]",
     "two monitors are named 'a'"),
    ("defaults: {colldown: 1h}\nmonitors: []", "defaults: unknown keys ['colldown']"),
    ("version: 2", "version"),
    ("monitors: [", "is not valid YAML"),
    ("- just a list", "must hold a mapping"),
])
def test_a_bad_policy_is_refused_naming_the_file_and_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_policy(text, "/etc/servoloop/monitors.yaml")
    assert "/etc/servoloop/monitors.yaml" in e.value.message and message in e.value.message


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read monitor policy"):
        load_policy(tmp_path / "nope.yaml")


def test_the_reloader_picks_up_edits_and_keeps_the_last_good_policy_on_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "monitors.yaml"
    path.write_text("monitors: [{name: a, metric: error_rate, compare: threshold, threshold: 0.1}]")
    reloader = PolicyReloader(path)
    assert [m.name for m in reloader.current.monitors] == ["a"] and not reloader.poll()

    path.write_text("monitors: [{name: b, metric: error_rate, compare: threshold, threshold: 0.2}]")
    assert reloader.poll() and [m.name for m in reloader.current.monitors] == ["b"] and reloader.generation == 1

    path.write_text("monitors: [{name: c, metric: nope, threshold: 0.2}]")
    assert not reloader.poll()
    assert [m.name for m in reloader.current.monitors] == ["b"]
    assert reloader.last_error is not None and "nope" in reloader.last_error.message

    path.write_text("monitors: []\n")
    assert reloader.poll() and reloader.current.monitors == [] and reloader.last_error is None


def test_the_reloader_refuses_a_bad_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "monitors.yaml"
    path.write_text("monitors: [{name: a}]")
    with pytest.raises(ConfigError):
        PolicyReloader(path)
    assert PolicyReloader(None).current == load_policy() and BUNDLED


def rate(x: int, n: int) -> Estimate:
    return Estimate(kind="rate", value=x / n if n else math.nan, n=n, ci=wilson_interval(x, n), successes=x)


def test_evaluate_a_rate_against_its_baseline() -> None:
    [policy] = parse_policy("monitors: [{name: s, metric: thumbs_up_rate, threshold: 0.05}]").monitors
    drop = evaluate(policy, rate(180, 300), rate(480, 600), alpha=0.01)
    assert drop.decision.level == "breach" and drop.deterioration == pytest.approx(0.2) and drop.p_value < 1e-6
    rise = evaluate(policy, rate(290, 300), rate(480, 600), alpha=0.01)
    assert rise.decision.level == "normal" and rise.p_value > 0.99  # one-sided: better is never a breach
    small = evaluate(policy, rate(18, 30), rate(480, 600), alpha=0.01)
    assert small.decision.level == "insufficient_data"


def test_evaluate_against_a_fixed_threshold_and_a_relative_change() -> None:
    [errors] = parse_policy("monitors: [{name: e, metric: error_rate, compare: threshold, threshold: 0.05, "
                            "clear: 0.02}]").monitors
    assert evaluate(errors, rate(30, 300), None, alpha=0.01).decision.level == "breach"   # 10 % > 5 %, p ~ 1e-4
    assert evaluate(errors, rate(17, 300), None, alpha=0.01).decision.level == "elevated"  # 5.7 %: not significant
    assert evaluate(errors, rate(3, 300), None, alpha=0.01).decision.level == "normal"

    [p95] = parse_policy("monitors: [{name: l, metric: latency_p95_ms, relative: true, threshold: 0.5}]").monitors
    base = Estimate(kind="quantile", value=200.0, n=1000, ci=Interval(190.0, 210.0))
    slow = Estimate(kind="quantile", value=400.0, n=1000, ci=Interval(380.0, 420.0))
    wide = Estimate(kind="quantile", value=400.0, n=1000, ci=Interval(150.0, 900.0))
    ev = evaluate(p95, slow, base, alpha=0.01)
    assert ev.decision.level == "breach" and ev.deterioration == pytest.approx(1.0) and ev.p_value is None
    assert evaluate(p95, wide, base, alpha=0.01).decision.level == "elevated"  # intervals overlap
