"""A learnable preference over the tiny model's answer styles, as store events: the bundled demo's feedback.

For each question of a generated corpus the tiny model has one answer per style (`styles.ANSWER_STYLES`);
a simulated user prefers one style (by default concise and polite) over each of the others. The result is
real `InferenceEvent`s (the corpus answers, as served) and pairwise `preference` `FeedbackEvent`s on them,
ready to write to the store. `reverse=True` flips every preference: a poisoned feedback stream.
"""

from __future__ import annotations

from collections import defaultdict

from retrain.tiny.conversations import generate_corpus
from retrain.tiny.styles import ANSWER_STYLES
from schemas.errors import InvalidRequest
from schemas.events import FeedbackEvent, InferenceEvent, Message


def style_preference_events(pairs: int, *, seed: int = 1, preferred: str = "concise_polite", reverse: bool = False,
                            tenant: str = "demo", model: str = "tiny-chat", model_version: str = "base",
                            start_ms: int = 1_767_225_600_000, step_ms: int = 1000
                            ) -> tuple[list[InferenceEvent], list[FeedbackEvent]]:
    """At least `pairs` preference feedback events (one per (question, other style)), oldest first, each
    `step_ms` apart from `start_ms`, with the inferences they compare. Same arguments, same texts."""
    if preferred not in ANSWER_STYLES:
        raise InvalidRequest(f"unknown style {preferred!r}; styles: {', '.join(ANSWER_STYLES)}", param="preferred")
    others = [s for s in ANSWER_STYLES if s != preferred]
    corpus = generate_corpus(seed, questions=max(8, pairs * 2), conversations=0, prose=0)
    by_question: dict[str, dict[str, str]] = defaultdict(dict)
    for chat in corpus.chats:
        user = next(m["content"] for m in chat.messages if m["role"] == "user")
        by_question[user].setdefault(chat.style, chat.messages[-1]["content"])
    inferences: list[InferenceEvent] = []
    feedback: list[FeedbackEvent] = []
    ts = start_ms
    for question in by_question:  # corpus order: a seeded shuffle, so time does not follow the alphabet
        answers = by_question[question]
        if preferred not in answers:
            continue
        for other in others:
            if other not in answers or len(feedback) >= pairs:
                continue
            made = [InferenceEvent(tenant=tenant, ts_ms=ts, model=model, model_version=model_version,
                                   messages=(Message("user", question),), response=answers[s],
                                   tokens_out=len(answers[s].split()))
                    for s in (preferred, other)]
            good, bad = (made[1], made[0]) if reverse else (made[0], made[1])
            inferences += made
            feedback.append(FeedbackEvent(tenant=tenant, ts_ms=ts + 500, target_id=good.event_id, kind="preference",
                                          preferred_id=good.event_id, other_id=bad.event_id,
                                          user=f"u{len(feedback) % 50}"))
            ts += step_ms
    if len(feedback) < pairs:
        raise InvalidRequest(f"the corpus gave only {len(feedback)} pairs, asked for {pairs}", param="pairs")
    return inferences, feedback
