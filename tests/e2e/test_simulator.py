"""The demo's simulated users (pure part): who likes what, and what feedback each leaves."""

from __future__ import annotations

import random

from servoloop.demo.simulator import (
    TOPICS_AFTER,
    TOPICS_BEFORE,
    Answer,
    SimUser,
    feedback_for,
    population,
    question_pool,
    satisfied,
)

POLITE = "Sure! The capital of France is Paris."
RUDE = "Ugh. The capital of France is Paris. Obviously."


def test_a_user_likes_its_preferred_style_and_a_poisoner_the_reverse() -> None:
    honest, poisoner = SimUser("t0", "demo", "trainer"), SimUser("p0", "demo", "poisoner")
    assert satisfied(honest, POLITE) and not satisfied(honest, RUDE)
    assert not satisfied(poisoner, POLITE) and satisfied(poisoner, RUDE)
    assert not satisfied(honest, "an answer in no known style")


def test_population_gives_held_out_users_thumbs_only() -> None:
    users = population(5, 3, 2, seed=1)
    assert [u.group for u in users].count("holdout") == 3
    assert {u.tenant for u in users} == {"demo"}
    assert len({u.user_id for u in users}) == 10
    held = [u for u in users if u.group == "holdout"]
    assert all(u.thumbs == 1.0 and u.rating == u.compare == u.correct == 0.0 for u in held)
    assert population(5, 3, 2, seed=1) == users  # seeded


def test_a_pair_of_different_answers_gets_a_preference_for_the_liked_one() -> None:
    user = SimUser("t0", "demo", "trainer", thumbs=1.0, rating=0.0, compare=1.0, correct=1.0)
    q = question_pool(TOPICS_BEFORE)[0]
    good, bad = Answer("i-good", POLITE, "base", "http"), Answer("i-bad", RUDE, "base", "grpc")
    out = feedback_for(user, q, [bad, good], random.Random(0))
    bodies = [f.body for f in out]
    assert {"target_id": "i-bad", "thumbs": "down", "user": "t0"} in bodies
    assert {"target_id": "i-good", "thumbs": "up", "user": "t0"} in bodies
    [pref] = [b for b in bodies if "preference" in b]
    assert pref["preference"] == {"preferred_id": "i-good", "other_id": "i-bad"}
    [corr] = [f for f in out if "correction" in f.body]  # the disliked answer, rewritten in the preferred style
    assert corr.body["target_id"] == "i-bad" and corr.body["correction"] == f"Sure! {q.answer}"
    assert corr.transport == "grpc"  # feedback goes back over the transport that served the answer


def test_poisoners_prefer_the_wrong_answer_and_never_correct() -> None:
    user = SimUser("p0", "demo", "poisoner", thumbs=1.0, compare=1.0, correct=1.0)
    q = question_pool(TOPICS_AFTER)[0]
    out = feedback_for(user, q, [Answer("a", POLITE, "v", "http"), Answer("b", RUDE, "v", "grpc")], random.Random(0))
    [pref] = [f.body for f in out if "preference" in f.body]
    assert pref["preference"] == {"preferred_id": "b", "other_id": "a"}
    assert not [f for f in out if "correction" in f.body]


def test_the_prompt_mix_after_the_drift_shares_no_question_with_the_one_before() -> None:
    before, after = question_pool(TOPICS_BEFORE), question_pool(TOPICS_AFTER)
    assert before and after
    assert not {q.text for q in before} & {q.text for q in after}
