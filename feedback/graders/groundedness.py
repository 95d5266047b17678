"""Groundedness: is each claim of an answer supported by the reference context the request carried?

For a request with context (system/context/document/tool messages, feedback/graders/base.context_of)
the answer is split into claims (sentences with some content), the context into sentences, and a claim
counts as supported when

  * its best cosine similarity to a context sentence (all-MiniLM-L6-v2) reaches `similarity`, and
  * every number and every capitalised name in the claim (beyond its first word) appears in the context.

The second check catches what embeddings miss: "The capital of France is Lyon" sits next to "... is
Paris" in embedding space. `score` is the share of unsupported claims (the answer's hallucination
rate); `label` is `hallucinated` when any claim is unsupported, else `grounded`; an answer without
claims is `no_claims` with score 0. Requests without context get no grade here: the self-consistency
grader (feedback/graders/consistency.py) covers them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feedback.graders.base import Embedder, answer_of, context_of, grade_of, split_sentences
from schemas.events import GradeEvent, InferenceEvent

GRADER_NAME = "groundedness"
VERSION = "1"

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+(?:[.,]\d+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NAME = re.compile(r"\b[A-Z][a-zA-Z]+")
_TOKEN = re.compile(r"[a-z]+|\d+(?:[.,]\d+)*")
# Words that carry no claim on their own; a sentence of only these (and short ones) is not a claim.
_STOP = frozenset("""a an the and or but if then so of to in on at by for with from as is are was were be been being
it its this that these those there here i you he she we they me him her us them my your our their what which who
whom how why when where do does did done have has had can could will would shall should may might must not no yes
sure hello hi well oh hope helps happy help thanks thank welcome great day anyway just very really also too any
all some more most much many""".split())


def claims_of(answer: str, *, min_content_words: int = 2) -> list[str]:
    """The sentences of `answer` that assert something (at least `min_content_words` non-stop words)."""
    out = []
    for s in split_sentences(answer):
        content = [w for w in _WORD.findall(s.lower()) if w not in _STOP]
        if len(content) >= min_content_words:
            out.append(s)
    return out


def _anchors(claim: str) -> set[str]:
    """Numbers and capitalised names (not the sentence's first word) a supporting context must mention."""
    names = {m.group(0).lower() for m in _NAME.finditer(claim) if m.start() > 0}
    return names | set(_NUMBER.findall(claim))


@dataclass(frozen=True)
class ClaimCheck:
    claim: str
    similarity: float
    missing: tuple[str, ...]
    supported: bool


class GroundednessGrader:
    """Grades answers of requests that carry context; `similarity` is the per-claim support threshold."""

    name = GRADER_NAME

    def __init__(self, embedder: Embedder, *, similarity: float = 0.6, max_claims: int = 32,
                 max_context_sentences: int = 256):
        self.embedder = embedder
        self.similarity = similarity
        self.max_claims = max_claims
        self.max_context_sentences = max_context_sentences
        self.version = f"{VERSION}-{embedder.name}-s{similarity:g}"

    def check(self, answer: str, context: str) -> list[ClaimCheck]:
        """Every claim of `answer` against `context` (blocking: embeds both)."""
        return self.check_many([(answer, context)])[0]

    def check_many(self, items: Sequence[tuple[str, str]]) -> list[list[ClaimCheck]]:
        """`check` for many (answer, context) pairs with one embedding call over their distinct sentences."""
        split = [(claims_of(a)[: self.max_claims], split_sentences(c)[: self.max_context_sentences]) for a, c in items]
        texts = sorted({t for claims, ctx in split if claims for t in (*claims, *ctx)})
        vectors = self.embedder.embed(texts) if texts else np.zeros((0, 1), np.float32)
        row = {t: i for i, t in enumerate(texts)}
        out = []
        for (claims, ctx), (_, context) in zip(split, items, strict=True):
            if not claims:
                out.append([])
                continue
            if not ctx:
                out.append([ClaimCheck(c, 0.0, tuple(sorted(_anchors(c))), False) for c in claims])
                continue
            sims = vectors[[row[c] for c in claims]] @ vectors[[row[c] for c in ctx]].T
            context_words = set(_TOKEN.findall(context.lower()))
            checks = []
            for claim, sim in zip(claims, sims.max(axis=1), strict=True):
                missing = tuple(sorted(a for a in _anchors(claim) if a not in context_words))
                checks.append(ClaimCheck(claim, float(sim), missing, bool(sim >= self.similarity and not missing)))
            out.append(checks)
        return out

    def _grade_all(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        todo = [(i, context_of(i)) for i in batch if answer_of(i).strip()]
        todo = [(i, c) for i, c in todo if c]  # no context: no grade (self-consistency is future work)
        results = self.check_many([(answer_of(i), c) for i, c in todo])
        return [self._grade(i, checks) for (i, _), checks in zip(todo, results, strict=True)]

    def _grade(self, inference: InferenceEvent, checks: list[ClaimCheck]) -> GradeEvent:
        if not checks:
            return grade_of(self, inference, score=0.0, label="no_claims", explanation='{"claims":0}')
        unsupported = [c for c in checks if not c.supported]
        explanation = json.dumps({
            "claims": len(checks), "unsupported": len(unsupported),
            "worst": [{"claim": c.claim[:200], "similarity": round(c.similarity, 3), "missing": list(c.missing)}
                      for c in unsupported[:3]]})
        return grade_of(self, inference, score=len(unsupported) / len(checks),
                        label="hallucinated" if unsupported else "grounded", explanation=explanation)

    async def grade(self, batch: Sequence[InferenceEvent]) -> list[GradeEvent]:
        return await asyncio.to_thread(self._grade_all, list(batch))
