"""Shadow comparison: replay sampled served requests to a candidate version and judge the two answers.

    comparer = ShadowComparer(ChatClient(candidate_url, model="chat"), candidate_version="v7")
    worker = GradingWorker(store, publish, settings, graders={"shadow_pairwise": comparer, ...})

The candidate (a canary arm or a not-yet-deployed version behind any OpenAI-compatible endpoint) gets
the stored request's messages again, off the request path: its answer goes to the judge and into the
grade's explanation, never to the user who asked, and never into `inferences` (it was not served).
Each grade is about the served inference (`target_id`, its version) against the candidate
(`other_version`): `win` when the served answer is better, `loss` when the candidate's is, `tie`
(including position-biased verdicts; judge_pair asks both orders). The candidate's win rate over the
served version is the rate of `loss` (`grade:shadow_pairwise:loss` in a monitor policy).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

from feedback.graders.base import answer_of, grade_of, question_of
from feedback.graders.judge import PairJudge, RulePairJudge, judge_pair
from feedback.graders.llm_judge import ChatClient
from schemas.events import GradeEvent, InferenceEvent

log = logging.getLogger(__name__)

GRADER_NAME = "shadow_pairwise"


class ShadowComparer:
    """A Grader: replays each inference to the candidate and judges served vs shadow answer in both orders."""

    name = GRADER_NAME

    def __init__(self, client: ChatClient, *, candidate_version: str, judge: PairJudge | None = None,
                 max_tokens: int = 256):
        self.client, self.candidate_version = client, candidate_version
        self.judge = judge if judge is not None else RulePairJudge()
        self.max_tokens = max_tokens
        self.version = f"{candidate_version}:{self.judge.name}-{self.judge.version}"
        self.failed = 0

    def _messages(self, inference: InferenceEvent) -> list[dict[str, str]]:
        if inference.messages:
            return [{"role": m.role, "content": m.content} for m in inference.messages]
        return [{"role": "user", "content": inference.prompt}]

    async def _compare(self, inference: InferenceEvent) -> GradeEvent | None:
        try:
            shadow = await self.client.chat(self._messages(inference), max_tokens=self.max_tokens,
                                            temperature=inference.temperature if inference.temperature <= 1 else 1.0)
        except Exception as e:  # the candidate being down costs this grade, not the cycle
            self.failed += 1
            log.warning("shadow replay of %s failed: %s", inference.event_id, e)
            return None
        v = await judge_pair(self.judge, question_of(inference), answer_of(inference), shadow)
        return grade_of(self, inference, score=v.score_a, label={"a": "win", "b": "loss", "tie": "tie"}[v.winner],
                        other_version=self.candidate_version,
                        explanation=json.dumps({"forward": v.forward, "backward": v.backward,
                                                "consistent": v.consistent, "shadow_answer": shadow[:1000]}))

    async def grade(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        todo = [i for i in batch if i.status == "ok" and answer_of(i).strip()
                and i.model_version != self.candidate_version]
        return [g for g in await asyncio.gather(*map(self._compare, todo)) if g is not None]
