"""A prompt-distribution shift caught by embedding drift becomes exactly one RetrainTrigger; no shift, none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.monitors.embeddings import PromptEmbedder
from feedback.monitors.policy import parse_policy
from feedback.monitors.runner import default_monitors, run_cycle, store_publisher
from feedback.store import Store, count_rows, write_events
from tests.feedback.monitors.test_drift import COOKING, CURRENT, LEGAL, REFERENCE, N, events, prompts

NOW = CURRENT[1]
POLICY = """
monitors:
  - name: prompt_drift
    kind: drift
    metric: prompt_embedding_drift
    window: {current: 1h, baseline: 1h}
    params: {tabular: false}
    action: {type: retrain, recipe: sft, data_window: 3d}
"""


@pytest.mark.parametrize("shift", [True, False], ids=["cooking-to-legal", "cooking-both"])
async def test_prompt_shift_detected_by_embedding_drift_emits_one_retrain_trigger(
        store: Store, embedder: PromptEmbedder, tmp_path: Path, shift: bool) -> None:
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], seed=1)
                       + events(prompts(LEGAL if shift else COOKING, N, 2), CURRENT[0], seed=2))
    monitors = default_monitors(tmp_path, embedder=embedder)
    policy = parse_policy(POLICY)

    report = await run_cycle(store, policy, now_ms=NOW, publish=store_publisher(store), monitors=monitors)
    assert not report.errors
    [result] = report.results
    assert (result.monitor, result.metric, result.model) == ("prompt_drift", "prompt_embedding_drift", "m")
    if not shift:
        assert result.status == "ok" and report.triggers == []
        return
    assert result.status == "alert"
    [trigger] = report.triggers
    evidence = json.loads(trigger.params)
    assert (trigger.method, trigger.model, trigger.monitor_event_id) == ("sft", "m", result.event_id)
    assert evidence["metric"] == "prompt_embedding_drift" and evidence["current"] == pytest.approx(result.value)
    assert evidence["sample_size"] == N and evidence["window"] == list(CURRENT)

    again = await run_cycle(store, policy, now_ms=NOW + 60_000, publish=store_publisher(store), monitors=monitors)
    assert again.triggers == []
    assert await count_rows(store, "retrain_triggers") == 1
