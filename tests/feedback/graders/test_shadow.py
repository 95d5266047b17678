"""Shadow comparison: sampled served requests are replayed to a candidate over real HTTP (an OpenAI-compatible
server), judged against the served answer in both orders, and the candidate's answers reach nobody but the judge."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from feedback.graders.llm_judge import ChatClient
from feedback.graders.settings import GraderSettings, GradingSettings
from feedback.graders.shadow import ShadowComparer
from feedback.graders.worker import GradingWorker
from feedback.monitors.policy import parse_policy
from feedback.monitors.runner import run_cycle, store_publisher
from feedback.store import Store, count_rows, write_events
from schemas.events import InferenceEvent, Message, now_ms
from tests.support.openai_upstream import RunningUpstream, UpstreamBehaviour

CURT = "Ugh. Paris is the capital of France. Look it up yourself next time."


@pytest.fixture
async def candidate() -> AsyncIterator[RunningUpstream]:
    u = await RunningUpstream(UpstreamBehaviour(reply="Sure! Paris is the capital of France.")).start()
    yield u
    await u.stop()


async def test_a_politer_candidate_wins_its_shadow_comparisons_and_its_answers_are_never_stored(
        store: Store, candidate: RunningUpstream) -> None:
    now = now_ms()
    served = [InferenceEvent(tenant="acme", model="chat", model_version="v1", ts_ms=now - 60_000 + k,
                             messages=(Message("user", "What is the capital of France?"),), response=CURT)
              for k in range(20)]
    await write_events(store, served)
    client = ChatClient(candidate.url, model="chat")
    comparer = ShadowComparer(client, candidate_version="v2")
    cfg = GradingSettings(settle_s=0, graders={"shadow_pairwise": GraderSettings(sample_rate=1.0)})
    report = await GradingWorker(store, store_publisher(store), cfg, graders={"shadow_pairwise": comparer},
                                 clock=lambda: now).run_once()
    await client.aclose()

    assert report.graded == {"shadow_pairwise": 20} and candidate.behaviour.requests == 20
    assert candidate.behaviour.last_body["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert await count_rows(store, "inferences") == 20  # the shadow answers were served to nobody
    rows = (await store.query("SELECT label, other_version, explanation FROM grades FINAL")).to_pylist()
    assert {(r["label"], r["other_version"]) for r in rows} == {("loss", "v2")}
    assert json.loads(rows[0]["explanation"])["shadow_answer"].strip() == "Sure! Paris is the capital of France."

    # The candidate's win rate over the served version, as a monitor metric.
    policy = parse_policy("""
version: 1
monitors:
  - {name: candidate_wins, kind: grade, metric: "grade:shadow_pairwise:loss", compare: threshold,
     threshold: 0.6, worse: increase, min_samples: 10}
""")
    cycle = await run_cycle(store, policy, now_ms=now, publish=store_publisher(store))
    [r] = [r for r in cycle.results if r.monitor == "candidate_wins"]
    assert (r.value, r.sample_size, r.status) == (1.0, 20, "alert")


async def test_a_candidate_that_is_down_costs_grades_not_the_cycle(store: Store) -> None:
    client = ChatClient("http://127.0.0.1:9/v1", model="chat", timeout_s=2)
    comparer = ShadowComparer(client, candidate_version="v2")
    inf = InferenceEvent(model="chat", model_version="v1", response=CURT, messages=(Message("user", "Hi"),))
    assert await comparer.grade([inf]) == []
    await client.aclose()
    assert comparer.failed == 1
