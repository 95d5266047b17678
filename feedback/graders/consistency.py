"""Self-consistency: for requests without reference context, do fresh samples of the model agree with its answer?

    grader = SelfConsistencyGrader(ChatClient(engine_url, model="chat"), embedder, samples=3)

The stored request's messages are sent `samples` more times to the same model (an OpenAI-compatible
endpoint serving that version) at `temperature`, off the request path; the answers go to nobody. The
served answer's mean cosine similarity to the samples (all-MiniLM-L6-v2) is its consistency: a model
that knows the answer tends to say the same thing again, one that makes it up tends not to (the
SelfCheckGPT idea, with embedding similarity as the agreement measure). `score` = 1 - mean similarity;
`label` = `inconsistent` below `agreement`, else `consistent`. Requests that carry context are left to
the groundedness grader; a failing endpoint costs the grade (counted in `failed`), never the cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

import numpy as np

from feedback.graders.base import Embedder, answer_of, context_of, grade_of
from feedback.graders.llm_judge import ChatClient
from schemas.events import GradeEvent, InferenceEvent

log = logging.getLogger(__name__)

GRADER_NAME = "self_consistency"


class SelfConsistencyGrader:
    name = GRADER_NAME

    def __init__(self, client: ChatClient, embedder: Embedder, *, samples: int = 3, temperature: float = 0.8,
                 agreement: float = 0.6, max_tokens: int = 256):
        self.client, self.embedder = client, embedder
        self.samples, self.temperature, self.agreement, self.max_tokens = samples, temperature, agreement, max_tokens
        self.version = f"{client.model}-n{samples}-t{temperature:g}-a{agreement:g}"
        self.failed = 0

    async def _samples(self, inference: InferenceEvent) -> list[str] | None:
        messages = ([{"role": m.role, "content": m.content} for m in inference.messages]
                    or [{"role": "user", "content": inference.prompt}])
        try:
            return list(await asyncio.gather(*(
                self.client.chat(messages, max_tokens=self.max_tokens, temperature=self.temperature)
                for _ in range(self.samples))))
        except Exception as e:
            self.failed += 1
            log.warning("self-consistency samples for %s failed: %s", inference.event_id, e)
            return None

    def _similarities(self, answer: str, samples: list[str]) -> np.ndarray:
        vectors = self.embedder.embed([answer, *samples])
        return vectors[1:] @ vectors[0]

    async def _grade_one(self, inference: InferenceEvent) -> GradeEvent | None:
        samples = await self._samples(inference)
        if samples is None:
            return None
        sims = await asyncio.to_thread(self._similarities, answer_of(inference), samples)
        mean = float(sims.mean())
        return grade_of(self, inference, score=max(0.0, 1.0 - mean),
                        label="consistent" if mean >= self.agreement else "inconsistent",
                        explanation=json.dumps({"similarities": [round(float(s), 3) for s in sims],
                                                "samples": [s[:300] for s in samples]}))

    async def grade(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        todo = [i for i in batch if i.status == "ok" and answer_of(i).strip() and not context_of(i)]
        return [g for g in await asyncio.gather(*map(self._grade_one, todo)) if g is not None]
