"""LLM-as-a-judge over any OpenAI-compatible engine (a vLLM fleet, the servoloop gateway, a hosted API).

    client = ChatClient("http://vllm:8000/v1", model="judge-model")
    grader = LLMJudge(client, criteria=("factuality", "helpfulness"))     # pointwise rubric scores
    verdict = await judge_pair(LLMPairJudge(client), question, a, b)     # pairwise, both orders

Rubric templates for factuality, coherence, tone and helpfulness ask for one integer from 1 to 5;
the grade's score is (n - 1) / 4 averaged over the criteria, `pass` at `pass_at`, each criterion in the
explanation. A reply without a usable number makes no grade (counted in `unparsed`), never a guess.
Pairwise prompts ask for `A`, `B` or `tie`; `judge_pair` asks both orders, so a judge that prefers a
position produces ties, not wins. Requests go out at temperature 0, with bounded concurrency.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

from feedback.graders.base import answer_of, context_of, grade_of, question_of
from feedback.graders.judge import PairOutcome
from schemas.events import GradeEvent, InferenceEvent

RUBRICS: dict[str, str] = {
    "factuality": "Is every statement in the answer factually correct{context_hint}? 1 = mostly false, 5 = all correct.",
    "coherence": "Is the answer clear, well organised and consistent with itself? 1 = incoherent, 5 = perfectly clear.",
    "tone": "Is the answer polite, respectful and appropriate in tone? 1 = rude or hostile, 5 = friendly and respectful.",
    "helpfulness": "Does the answer address the question and help the user? 1 = useless or off topic, 5 = fully helpful.",
}
_POINTWISE = """You are grading one answer of an AI assistant.
{context}Question: {question}
Answer: {answer}

{rubric}
Reply with a single integer from 1 to 5 and nothing else."""
_PAIRWISE = """You are comparing two answers of AI assistants to the same question.
Question: {question}

Answer A: {first}

Answer B: {second}

Which answer is better (correct, helpful, polite, concise)? Reply with exactly one of: A, B, tie."""
_SCORE = re.compile(r"\b([1-5])\b")
_CHOICE = re.compile(r"^\W*(a|b|tie)\b", re.IGNORECASE)


class ChatClient:
    """A minimal OpenAI-compatible chat client (POST {base_url}/chat/completions), temperature 0."""

    def __init__(self, base_url: str, *, model: str, api_key: str = "", timeout_s: float = 60.0,
                 max_tokens: int = 8, concurrency: int = 4):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.max_tokens = max_tokens
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers)
        self._slots = asyncio.Semaphore(concurrency)

    async def complete(self, prompt: str) -> str:
        """The assistant's reply to one user message. Raises httpx.HTTPError on transport or HTTP errors."""
        return await self.chat([{"role": "user", "content": prompt}])

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                   temperature: float = 0.0) -> str:
        """The assistant's reply to a conversation. Raises httpx.HTTPError on transport or HTTP errors."""
        async with self._slots:
            r = await self._client.post(self._url, json={
                "model": self.model, "messages": messages, "temperature": temperature,
                "max_tokens": max_tokens or self.max_tokens})
        r.raise_for_status()
        return str(r.json()["choices"][0]["message"]["content"] or "")

    async def aclose(self) -> None:
        await self._client.aclose()


def parse_score(reply: str) -> int | None:
    """The first integer 1..5 in a judge's reply, or None."""
    m = _SCORE.search(reply)
    return int(m.group(1)) if m else None


def parse_choice(reply: str) -> PairOutcome | None:
    """`first` (A), `second` (B) or `tie` from a judge's reply, or None when it names none of them."""
    m = _CHOICE.match(reply.strip())
    if not m:
        return None
    return {"a": "first", "b": "second", "tie": "tie"}[m.group(1).lower()]  # type: ignore[return-value]


class LLMJudge:
    """Pointwise rubric grades from an LLM judge: one GradeEvent per answer over `criteria`."""

    name = "llm_judge"

    def __init__(self, client: ChatClient, *, criteria: Sequence[str] = ("factuality", "coherence", "tone", "helpfulness"),
                 pass_at: float = 0.75):
        unknown = set(criteria) - set(RUBRICS)
        if unknown:
            raise ValueError(f"unknown judge criteria {sorted(unknown)}; one of {sorted(RUBRICS)}")
        self.client, self.criteria, self.pass_at = client, tuple(criteria), pass_at
        self.version = f"{client.model}-{'+'.join(self.criteria)}"
        self.unparsed = 0

    def prompt(self, inference: InferenceEvent, criterion: str) -> str:
        context = context_of(inference)
        return _POINTWISE.format(
            context=f"Reference context: {context[:4000]}\n" if context else "", question=question_of(inference)[:4000],
            answer=answer_of(inference)[:4000],
            rubric=RUBRICS[criterion].format(context_hint=" given the reference context" if context else ""))

    async def _grade_one(self, inference: InferenceEvent) -> GradeEvent | None:
        replies = await asyncio.gather(*(self.client.complete(self.prompt(inference, c)) for c in self.criteria))
        scores: dict[str, Any] = {}
        for criterion, reply in zip(self.criteria, replies, strict=True):
            n = parse_score(reply)
            if n is None:
                self.unparsed += 1
                return None
            scores[criterion] = (n - 1) / 4
        overall = sum(scores.values()) / len(scores)
        return grade_of(self, inference, score=overall, label="pass" if overall >= self.pass_at else "fail",
                        explanation=json.dumps(scores))

    async def grade(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        todo = [i for i in batch if answer_of(i).strip() and i.status == "ok"]
        return [g for g in await asyncio.gather(*map(self._grade_one, todo)) if g is not None]


class LLMPairJudge:
    """A `PairJudge` asking the LLM which of two answers is better (use with judge_pair: both orders)."""

    name = "llm_judge_pairwise"

    def __init__(self, client: ChatClient):
        self.client = client
        self.version = client.model
        self.unparsed = 0

    async def compare(self, question: str, first: str, second: str) -> PairOutcome:
        reply = await self.client.complete(_PAIRWISE.format(question=question[:4000], first=first[:4000],
                                                            second=second[:4000]))
        choice = parse_choice(reply)
        if choice is None:
            self.unparsed += 1
            return "tie"  # no preference stated is no preference
        return choice
