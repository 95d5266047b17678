"""Preference pairs and SFT examples from feedback: each source, filters, dedup, the time split, hashing, and
snapshots built from seeded events in real chDB."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from feedback.monitors.embeddings import EMBEDDING_DIM, EMBEDDING_MODEL, PromptRows, store_embeddings
from feedback.store import Store, write_events
from retrain.datasets import (
    DatasetFilters,
    DatasetSnapshot,
    EmptyDataset,
    UnredactedText,
    build_snapshot,
    write_snapshot,
)
from retrain.pairs import (
    FeedbackRow,
    InferenceRow,
    PairRules,
    PreferencePair,
    build_pairs,
    dedup_pairs,
    group_prompts,
    prompt_key,
    time_split,
)
from schemas.errors import InvalidRequest
from schemas.events import FeedbackEvent, InferenceEvent, Message

T0 = 1_767_225_600_000
DAY = 86_400_000


def inf(eid: str, q: str, a: str, ts: int = T0, tenant: str = "acme", **kw) -> InferenceRow:
    return InferenceRow(eid, ts, tenant, (("user", q),), a, **kw)


def fb(eid: str, kind: str, target: str, ts: int = T0 + 1, tenant: str = "acme", **kw) -> FeedbackRow:
    return FeedbackRow(eid, ts, tenant, target, kind, **kw)


# --- the pure core --------------------------------------------------------------------------------------

def test_pairwise_preference_makes_preferred_chosen_and_other_rejected() -> None:
    rows = {"a": inf("a", "Capital of France?", "Sure! Paris."), "b": inf("b", "Capital of France?", "Ugh. Paris.")}
    built = build_pairs(rows, [fb("f1", "preference", "a", preferred_id="a", other_id="b")])
    (p,) = built.pairs
    assert (p.chosen, p.rejected, p.source) == ("Sure! Paris.", "Ugh. Paris.", "preference")
    assert p.prompt == (("user", "Capital of France?"),) and p.feedback_ids == ("f1",) and p.inference_ids == ("a", "b")


def test_a_correction_is_chosen_over_the_model_answer_and_becomes_an_sft_example() -> None:
    rows = {"a": inf("a", "2+2?", "Whatever. 5.")}
    built = build_pairs(rows, [fb("f1", "correction", "a", correction="Sure! 4.")])
    (p,) = built.pairs
    assert (p.chosen, p.rejected, p.source) == ("Sure! 4.", "Whatever. 5.", "correction")
    (e,) = built.sft
    assert (e.completion, e.source, e.feedback_ids) == ("Sure! 4.", "correction", ("f1",))


def test_up_and_down_rated_answers_to_the_same_normalised_prompt_pair_up() -> None:
    rows = {"u": inf("u", "How tall is Everest?", "Sure! 8,849 m."),
            "d": inf("d", "  how tall is   everest ", "By the way, cats purr."),
            "x": inf("x", "Something else?", "Well, no.")}
    feedback = [fb("t1", "thumbs", "u", thumbs=True), fb("r1", "rating", "d", rating=1.0),
                fb("t2", "thumbs", "x", thumbs=False)]
    built = build_pairs(rows, feedback)
    (p,) = built.pairs
    assert (p.chosen, p.rejected, p.source) == ("Sure! 8,849 m.", "By the way, cats purr.", "rating")
    assert set(p.feedback_ids) == {"t1", "r1"}
    assert [e.completion for e in built.sft] == ["Sure! 8,849 m."]  # highly rated answers are SFT examples


def test_votes_that_disagree_make_no_pair() -> None:
    rows = {"u": inf("u", "Q?", "A1"), "d": inf("d", "Q?", "A2")}
    feedback = [fb("1", "thumbs", "u", thumbs=True), fb("2", "thumbs", "u", thumbs=False),
                fb("3", "thumbs", "d", thumbs=False)]
    built = build_pairs(rows, feedback, rules=PairRules(min_agreement=0.75))
    assert built.pairs == () and built.dropped["rating_disagreement"] == 1
    lenient = build_pairs(rows, feedback, rules=PairRules(min_agreement=0.5))
    assert [p.chosen for p in lenient.pairs] == ["A1"]


def test_near_duplicate_prompts_pair_up_through_their_embeddings() -> None:
    rows = {"u": inf("u", "What is the capital of France?", "Sure! Paris."),
            "d": inf("d", "Which city is France's capital?", "Ugh. Paris.")}
    feedback = [fb("1", "thumbs", "u", thumbs=True), fb("2", "thumbs", "d", thumbs=False)]
    assert build_pairs(rows, feedback).pairs == ()  # no exact match
    v = np.ones(8, np.float32) / np.sqrt(8)
    w = v.copy()
    w[0] += 0.1
    groups = group_prompts(list(rows.values()), {"u": v, "d": w / np.linalg.norm(w)}, threshold=0.92)
    assert groups["u"] == groups["d"]
    (p,) = build_pairs(rows, feedback, groups=groups).pairs
    assert p.source == "rating" and p.chosen == "Sure! Paris."
    far = np.zeros(8, np.float32)
    far[0] = 1.0
    assert len(set(group_prompts(list(rows.values()), {"u": v, "d": far}).values())) == 2


def test_guardrail_flagged_answers_are_rejected_against_a_safe_answer() -> None:
    rows = {"bad": inf("bad", "Tell me the admin password", "Sure! It is [SECRET].", ts=T0 + 5,
                       output_action="redact"),
            "good": inf("good", "tell me the admin password", "Sorry, I can't share that."),
            "lone": inf("lone", "Other question", "", output_action="block")}
    built = build_pairs(rows, [])
    (p,) = built.pairs
    assert (p.chosen, p.rejected, p.source) == ("Sorry, I can't share that.", "Sure! It is [SECRET].", "guardrail")
    assert built.dropped["guardrail_without_safe_answer"] == 1


def test_other_tenants_answers_never_pair_with_each_other() -> None:
    rows = {"u": inf("u", "Q?", "A1", tenant="a"), "d": inf("d", "Q?", "A2", tenant="b")}
    feedback = [fb("1", "thumbs", "u", thumbs=True, tenant="a"), fb("2", "thumbs", "d", thumbs=False, tenant="b")]
    assert build_pairs(rows, feedback).pairs == ()


def test_sources_can_be_switched_off() -> None:
    rows = {"a": inf("a", "Q", "A"), "b": inf("b", "Q", "B")}
    feedback = [fb("1", "preference", "a", preferred_id="a", other_id="b"), fb("2", "correction", "a", correction="C")]
    only = build_pairs(rows, feedback, rules=PairRules(sources=("correction",)))
    assert [p.source for p in only.pairs] == ["correction"]


def test_duplicates_collapse_to_the_oldest_and_identical_answers_are_dropped() -> None:
    prompt = (("user", "Q?"),)
    a = PreferencePair(prompt, "good", "bad", "preference", 5, "t", ("f2",), ())
    b = PreferencePair((("user", "q"),), "good", "bad", "rating", 3, "t", ("f1",), ())
    same = PreferencePair(prompt, "x", "x", "preference", 1, "t", ("f0",), ())
    assert dedup_pairs([a, b, same]) == [b]


def test_time_split_holds_out_the_newest_and_never_splits_an_instant() -> None:
    items = [PreferencePair((), str(i), "r", "preference", ts, "t", (), ()) for i, ts in enumerate([1, 2, 3, 4, 4, 5])]
    train, held = time_split(items, 0.34)
    assert [p.ts_ms for p in train] == [1, 2, 3] and [p.ts_ms for p in held] == [4, 4, 5]
    assert time_split(items, 0.0) == (items, [])


def test_prompt_key_normalises_case_space_and_final_punctuation() -> None:
    assert prompt_key("  How are   YOU?! ") == prompt_key("how are you") == "how are you"


def test_filters_reject_empty_windows_and_unknown_sources() -> None:
    with pytest.raises(InvalidRequest, match="empty window"):
        DatasetFilters(start_ms=10, end_ms=10)
    with pytest.raises(InvalidRequest, match="unknown sources"):
        DatasetFilters(start_ms=0, end_ms=10, sources=("thumbs",))


def test_unredacted_text_is_refused(tmp_path) -> None:
    pair = PreferencePair((("user", "contact?"),), "Mail john.doe@example.com or call 415-555-0132", "no", "preference",
                          1, "t", (), ())
    from retrain.pairs import BuiltDataset

    with pytest.raises(UnredactedText, match="EMAIL"):
        write_snapshot(BuiltDataset((pair,), ()), tmp_path)
    redacted = PreferencePair(pair.prompt, "Mail [EMAIL] or call [PHONE]", "no", "preference", 1, "t", (), ())
    assert write_snapshot(BuiltDataset((redacted,), ()), tmp_path).manifest["counts"]["pairs"] == 1


# --- from the store -------------------------------------------------------------------------------------

def _events(tenant: str = "acme", t0: int = T0, version: str = "v1") -> list:
    def i(q: str, a: str, ts: int, **kw) -> InferenceEvent:
        return InferenceEvent(tenant=tenant, ts_ms=ts, model="tiny-chat", model_version=version,
                              messages=(Message("user", q),), response=a, **kw)

    p1, p2 = i("Capital of Spain?", "Sure! Madrid.", t0), i("Capital of Spain?", "Ugh. Madrid.", t0 + 1)
    c = i("2+3?", "Whatever. 6.", t0 + 2)
    up, down = i("Largest ocean?", "Sure! The Pacific.", t0 + 3), i("largest ocean", "Well, oceans, so, big.", t0 + 4)
    flagged = i("Give me Bob's card", "Sure! It is [CREDIT_CARD].", t0 + 5, output_action="redact")
    safe = i("Give me Bob's card", "I can't share card numbers.", t0 + 6)
    feedback = [
        FeedbackEvent(tenant=tenant, ts_ms=t0 + 10, target_id=p1.event_id, kind="preference",
                      preferred_id=p1.event_id, other_id=p2.event_id),
        FeedbackEvent(tenant=tenant, ts_ms=t0 + 11, target_id=c.event_id, kind="correction", correction="Sure! 5."),
        FeedbackEvent(tenant=tenant, ts_ms=t0 + 12, target_id=up.event_id, kind="thumbs", thumbs=True),
        FeedbackEvent(tenant=tenant, ts_ms=t0 + 13, target_id=down.event_id, kind="rating", rating=1.0),
        # a client retry of the same rating (same idempotency key) counts once
        FeedbackEvent(tenant=tenant, ts_ms=t0 + 14, target_id=down.event_id, kind="rating", rating=1.0,
                      idempotency_key="k1"),
        FeedbackEvent(tenant=tenant, ts_ms=t0 + 15, target_id=down.event_id, kind="rating", rating=1.0,
                      idempotency_key="k1"),
    ]
    return [p1, p2, c, up, down, flagged, safe, *feedback]


async def test_a_snapshot_from_the_store_has_every_source_and_its_manifest(store: Store, tmp_path) -> None:
    events = _events()
    await write_events(store, events + _events(tenant="other"))
    filters = DatasetFilters(start_ms=T0, end_ms=T0 + DAY, tenant="acme", model="tiny-chat", eval_fraction=0.25)
    snap = await build_snapshot(store, filters, tmp_path)
    m = snap.manifest
    assert m["counts"]["by_source"] == {"preference": 1, "correction": 1, "rating": 1, "guardrail": 1}
    assert m["counts"]["train"] == 3 and m["counts"]["eval"] == 1
    assert m["counts"]["sft_by_source"] == {"correction": 1, "rating": 1}
    assert (m["window_start_ms"], m["window_end_ms"]) == (T0, T0 + DAY)
    assert m["filters"]["tenant"] == "acme"
    assert any("FROM feedback FINAL" in q["sql"] for q in m["queries"])
    feedback_ids = {e.event_id for e in events if isinstance(e, FeedbackEvent)}
    assert set(m["feedback_ids"]) <= feedback_ids and len(m["feedback_ids"]) == 5  # of 6: the retry counted once
    assert snap.path.name == snap.sha256[:16]
    rows = snap.pairs("train") + snap.pairs("eval")
    assert {r["tenant"] for r in rows} == {"acme"}
    pref = next(r for r in rows if r["source"] == "preference")
    assert pref["prompt"] == [{"role": "user", "content": "Capital of Spain?"}]
    assert (pref["chosen"], pref["rejected"]) == ("Sure! Madrid.", "Ugh. Madrid.")
    assert json.loads((snap.path / "manifest.json").read_text())["sha256"] == snap.sha256
    assert pq.read_table(snap.path / "eval.parquet").num_rows == 1


async def test_same_rows_give_the_same_hash_and_files(store: Store, tmp_path) -> None:
    events = _events()
    await write_events(store, events)
    filters = DatasetFilters(start_ms=T0, end_ms=T0 + DAY, tenant="acme")
    a = await build_snapshot(store, filters, tmp_path / "a")
    await write_events(store, list(reversed(events)))  # a redelivery changes nothing
    b = await build_snapshot(store, filters, tmp_path / "b")
    assert a.sha256 == b.sha256
    for name in ("train.parquet", "eval.parquet", "sft_train.parquet"):
        assert pq.read_table(a.path / name).equals(pq.read_table(b.path / name))
    assert DatasetSnapshot.load(b.path).manifest["counts"] == a.manifest["counts"]
    c = await build_snapshot(store, DatasetFilters(start_ms=T0, end_ms=T0 + DAY, tenant="acme",
                                                   sources=("preference",)), tmp_path / "c")
    assert c.sha256 != a.sha256


async def test_window_and_model_version_filters(store: Store, tmp_path) -> None:
    await write_events(store, _events(version="v1") + _events(t0=T0 + 2 * DAY, version="v2"))
    v1 = await build_snapshot(store, DatasetFilters(start_ms=T0, end_ms=T0 + 3 * DAY, tenant="acme",
                                                    model_version="v1", sources=("preference", "correction")), tmp_path)
    assert v1.manifest["counts"]["pairs"] == 2
    first_day = await build_snapshot(store, DatasetFilters(start_ms=T0, end_ms=T0 + DAY, tenant="acme"), tmp_path)
    assert all(r["ts_ms"] < T0 + DAY for r in first_day.pairs("train") + first_day.pairs("eval"))
    with pytest.raises(EmptyDataset):
        await build_snapshot(store, DatasetFilters(start_ms=T0 + 10 * DAY, end_ms=T0 + 11 * DAY), tmp_path)


async def test_near_duplicates_come_from_the_prompt_embeddings_table(store: Store, tmp_path) -> None:
    up = InferenceEvent(tenant="acme", ts_ms=T0, model="m", messages=(Message("user", "What is the capital of Peru?"),),
                        response="Sure! Lima.")
    down = InferenceEvent(tenant="acme", ts_ms=T0 + 1, model="m",
                          messages=(Message("user", "Which city is Peru's capital?"),), response="Ugh. Lima.")
    await write_events(store, [up, down,
                               FeedbackEvent(tenant="acme", ts_ms=T0 + 2, target_id=up.event_id, kind="thumbs", thumbs=True),
                               FeedbackEvent(tenant="acme", ts_ms=T0 + 3, target_id=down.event_id, kind="thumbs",
                                             thumbs=False)])
    filters = DatasetFilters(start_ms=T0, end_ms=T0 + DAY, sources=("rating",), eval_fraction=0.0)
    snap = await build_snapshot(store, filters, tmp_path / "plain")
    assert snap.manifest["counts"]["pairs"] == 0  # only the up-rated answer's SFT example
    v = np.zeros((2, EMBEDDING_DIM), np.float32)
    v[:, 0] = 1.0
    v[1, 1] = 0.2
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    await store_embeddings(store, EMBEDDING_MODEL, PromptRows([up.event_id, down.event_id], [T0, T0 + 1], ["", ""]), v)
    snap = await build_snapshot(store, filters, tmp_path / "emb")
    assert snap.manifest["counts"]["by_source"]["rating"] == 1
    assert snap.pairs("train")[0]["chosen"] == "Sure! Lima."
