"""Drift monitors on real chDB: prompt-distribution shift caught by embedding drift, no shift -> no alert."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import numpy as np
import pandas as pd
import pytest

from feedback.monitors.base import TimeRange
from feedback.monitors.drift import (
    DATASET_METRIC,
    EMBEDDING_METRIC,
    DriftDetector,
    DriftSettings,
    auc_null_quantile,
    embedding_drift,
    novel_prompts,
    prune_reports,
    results_by_metric,
    tabular_drift,
)
from feedback.monitors.embeddings import PromptEmbedder, backfill_embeddings, prompt_texts
from feedback.monitors.request_features import Group, feature_frames, sample_window
from feedback.store import Store, write_events
from schemas.events import InferenceEvent, Message, MonitorResult

T0 = 1_780_000_000_000
HOUR = 3_600_000
REFERENCE = (T0, T0 + HOUR)
CURRENT = (T0 + HOUR, T0 + 2 * HOUR)
N = 300

COOKING = (["How long should I", "What is the best way to", "At what temperature do I", "Can I",
            "Why does my recipe fail when I"],
           ["roast", "bake", "braise", "grill", "simmer", "poach", "saute", "steam"],
           ["a whole chicken", "sourdough bread", "short ribs", "salmon fillets", "root vegetables",
            "a pork shoulder", "chocolate cake", "risotto", "lentil soup", "banana bread"],
           ["for a dinner party?", "in a cast iron pan?", "without a thermometer?", "with fresh herbs?",
            "at high altitude?", "for meal prep this week?"])
LEGAL = (["Is it legal for my landlord to", "Can my employer", "What are my rights if a company tries to",
          "Do I need a lawyer if the city wants to", "How do I respond when a court orders me to"],
         ["terminate", "withhold", "enforce", "void", "contest", "garnish", "seize", "amend"],
         ["my lease agreement", "my security deposit", "a non-compete clause", "my final paycheck",
          "a signed contract", "my property title", "a restraining order", "my disability claim"],
         ["under state law?", "without written notice?", "after the deadline passed?", "in small claims court?",
          "before the hearing?", "if I already filed an appeal?"])


def prompts(templates: tuple[list[str], ...], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(part) for part in templates) for _ in range(n)]


def events(texts: list[str], start_ms: int, *, model: str = "m", seed: int = 0) -> list[InferenceEvent]:
    """Inferences spread over one hour, half completions and half chats, with plausible numbers."""
    rng = random.Random(seed)
    out = []
    for i, text in enumerate(texts):
        chat = i % 2 == 0
        out.append(InferenceEvent(
            tenant="acme", model=model, model_version="v1", ts_ms=start_ms + i * (HOUR // len(texts)),
            operation="chat" if chat else "text_completion", prompt="" if chat else text,
            messages=(Message("system", "You are helpful."), Message("user", text)) if chat else (),
            response="Here is an answer. " * rng.randint(2, 6), tokens_in=len(text) // 4,
            tokens_out=rng.randint(20, 60), temperature=0.7, max_tokens=256,
            guardrail_types=("email",) if rng.random() < 0.05 else ()))
    return out


def detector(embedder: PromptEmbedder, tmp_path: Path, **settings: object) -> DriftDetector:
    return DriftDetector(DriftSettings(**settings), report_dir=tmp_path / "reports", embedder=embedder)  # type: ignore[arg-type]


def alerts(results: list[MonitorResult], metric: str) -> list[MonitorResult]:
    return [r for r in results if r.metric == metric and r.status == "alert"]


async def test_prompt_distribution_shift_raises_exactly_one_embedding_drift_alert(
        store: Store, embedder: PromptEmbedder, tmp_path: Path) -> None:
    legal = prompts(LEGAL, N, 2)
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], seed=1) + events(legal, CURRENT[0], seed=2))

    results = await detector(embedder, tmp_path).detect(store, reference=REFERENCE, current=CURRENT)

    assert len(alerts(results, EMBEDDING_METRIC)) == 1
    emb = results_by_metric(results)[("m", "", EMBEDDING_METRIC)]
    details = msgspec.json.decode(emb.details)
    assert emb.value > 0.9 and emb.threshold == 0.55 and details["method"] == "model"
    assert details["null_quantile"] == pytest.approx(auc_null_quantile(N, N, 0.99))
    novel = details["novel_prompts"]  # evidence for the operator: new prompts unlike any reference one
    assert len(novel) == 5 and all(p["prompt"] in legal and p["nearest_similarity"] < 0.5 for p in novel)
    assert details["embedding_samples"] == [N, N] and emb.sample_size == N
    assert (emb.window_start_ms, emb.window_end_ms) == CURRENT and details["baseline_sample_size"] == N


class WatchedStore:
    """The real store, with the event ids each prompt-text read asked for recorded."""

    def __init__(self, store: Store):
        self._store = store
        self.text_reads: list[list[str]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def query(self, sql: str, params: dict | None = None):  # type: ignore[no-untyped-def]
        if "AS text FROM inferences" in sql:
            self.text_reads.append(list((params or {})["ids"]))
        return await self._store.query(sql, params)


async def test_prompt_texts_are_read_only_for_uncached_prompts_and_the_novelty_evidence(
        store: Store, embedder: PromptEmbedder, tmp_path: Path) -> None:
    cooking, legal = prompts(COOKING, N, 1), prompts(LEGAL, N, 2)
    await write_events(store, events(cooking, REFERENCE[0], seed=1) + events(legal, CURRENT[0], seed=2))
    watched = WatchedStore(store)
    first = await detector(embedder, tmp_path, examples=0).detect(watched, reference=REFERENCE, current=CURRENT)  # type: ignore[arg-type]
    assert sorted(len(ids) for ids in watched.text_reads) == [N, N]  # nothing cached yet: each window's texts, once

    watched.text_reads.clear()
    again = await detector(embedder, tmp_path, examples=0).detect(watched, reference=REFERENCE, current=CURRENT)  # type: ignore[arg-type]
    assert watched.text_reads == []  # every embedding cached: no text is read
    assert results_by_metric(again)[("m", "", EMBEDDING_METRIC)].value == results_by_metric(first)[("m", "", EMBEDDING_METRIC)].value

    with_evidence = await detector(embedder, tmp_path).detect(watched, reference=REFERENCE, current=CURRENT)  # type: ignore[arg-type]
    (read,) = watched.text_reads  # the novelty evidence: the current window's prompts only
    assert set(await prompt_texts(store, read)) <= set(legal) and len(read) == N
    novel = msgspec.json.decode(results_by_metric(with_evidence)[("m", "", EMBEDDING_METRIC)].details)["novel_prompts"]
    assert len(novel) == 5 and all(p["prompt"] in legal for p in novel)


async def test_same_prompt_distribution_raises_no_drift_alert(
        store: Store, embedder: PromptEmbedder, tmp_path: Path) -> None:
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], seed=1)
                       + events(prompts(COOKING, N, 3), CURRENT[0], seed=3))

    results = await detector(embedder, tmp_path).detect(store, reference=REFERENCE, current=CURRENT)

    assert [r.status for r in results if r.metric == EMBEDDING_METRIC] == ["ok"]
    assert not [r for r in results if r.status == "alert"]
    emb = results_by_metric(results)[("m", "", EMBEDDING_METRIC)]
    assert emb.value < 0.6


async def test_every_feature_column_gets_a_drift_score_and_the_run_saves_an_html_report(
        store: Store, embedder: PromptEmbedder, tmp_path: Path) -> None:
    cyrillic = [f"Подскажите, пожалуйста, как правильно приготовить это блюдо дома: {t}"
                for t in prompts(COOKING, N, 4)]
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], seed=1)
                       + events(cyrillic, CURRENT[0], seed=4))

    results = await detector(embedder, tmp_path, embeddings=False).detect(store, reference=REFERENCE,
                                                                           current=CURRENT)

    by = {r.metric: r for r in results}
    columns = {m.removeprefix("column:") for m in by if m.startswith("column:")}
    assert {"prompt_chars", "response_chars", "tokens_in", "tokens_out", "non_ascii_share", "cyrillic_share",
            "script", "operation", "guard_email"} <= columns
    # constant in both windows: no information, left out of the test (and named as skipped)
    assert "temperature" not in columns and "cjk_share" not in columns
    assert by["column:cyrillic_share"].status == "warn" and by["column:script"].status == "warn"
    assert by["column:operation"].status == "ok" and by["column:language"].status == "warn"
    dataset = msgspec.json.decode(by[DATASET_METRIC].details)
    assert "temperature" in dataset["skipped_constant"] and "cyrillic_share" in dataset["drifted"]
    assert by[DATASET_METRIC].value == dataset["drifted_columns"] / dataset["columns"]
    report = Path(dataset["report"])
    assert report.is_file() and report.parent == tmp_path / "reports" and "Drift" in report.read_text()
    assert all(msgspec.json.decode(r.details)["report"] == str(report) for r in results)


async def test_prompt_embeddings_are_cached_so_a_second_run_embeds_nothing(
        store: Store, embedder: PromptEmbedder, tmp_path: Path) -> None:
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], seed=1)
                       + events(prompts(LEGAL, N, 2), CURRENT[0], seed=2))
    d = detector(embedder, tmp_path, tabular=False)

    first = (await d.detect(store, reference=REFERENCE, current=CURRENT))[0]
    second = (await d.detect(store, reference=REFERENCE, current=CURRENT))[0]
    cache_only = (await detector(embedder, tmp_path, tabular=False, embed_missing=False)
                  .detect(store, reference=REFERENCE, current=CURRENT))[0]

    assert msgspec.json.decode(first.details)["embedded_now"] == 2 * N
    assert msgspec.json.decode(second.details)["embedded_now"] == 0
    assert (second.value, second.status) == (first.value, first.status) == (cache_only.value, "alert")
    stored = await store.query("SELECT count() AS n, uniqExact(event_id) AS ids, any(length(embedding)) AS dim "
                               "FROM prompt_embeddings FINAL")
    assert stored.to_pylist() == [{"n": 2 * N, "ids": 2 * N, "dim": 384}]


async def test_backfill_embeds_each_prompt_of_a_window_once(store: Store, embedder: PromptEmbedder) -> None:
    chats_and_completions = events(prompts(COOKING, 40, 5), REFERENCE[0], seed=5)
    await write_events(store, chats_and_completions + events(prompts(LEGAL, 10, 6), CURRENT[0], seed=6))

    first = await backfill_embeddings(store, embedder, start_ms=REFERENCE[0], end_ms=REFERENCE[1], chunk=16)
    again = await backfill_embeddings(store, embedder, start_ms=REFERENCE[0], end_ms=REFERENCE[1])

    assert (first, again) == (40, 0)
    stored = await store.query("SELECT event_id, embedding FROM prompt_embeddings FINAL ORDER BY event_id")
    assert stored.column("event_id").to_pylist() == sorted(e.event_id for e in chats_and_completions)
    by_id = dict(zip(stored.column("event_id").to_pylist(), stored.column("embedding").to_pylist(), strict=True))
    chat = chats_and_completions[0]  # the user turn is what gets embedded, not the system prompt
    assert np.allclose(by_id[chat.event_id], embedder.embed([chat.messages[1].content])[0], atol=1e-5)


async def test_a_window_under_min_samples_is_insufficient_data(
        store: Store, embedder: PromptEmbedder, tmp_path: Path) -> None:
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], seed=1)
                       + events(prompts(LEGAL, 20, 2), CURRENT[0], seed=2))

    results = await detector(embedder, tmp_path).detect(store, reference=REFERENCE, current=CURRENT)

    assert {(r.metric, r.status, r.sample_size) for r in results} == {
        (DATASET_METRIC, "insufficient_data", 20), (EMBEDDING_METRIC, "insufficient_data", 20)}


async def test_groups_are_per_model_and_embeddings_can_be_switched_off(store: Store, tmp_path: Path) -> None:
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], model="a", seed=1)
                       + events(prompts(COOKING, N, 2), CURRENT[0], model="a", seed=2)
                       + events(prompts(COOKING, N, 3), REFERENCE[0], model="b", seed=3)
                       + events(prompts(LEGAL, N, 4), CURRENT[0], model="b", seed=4))
    d = DriftDetector(DriftSettings(embeddings=False), report_dir=tmp_path)

    results = await d.detect(store, reference=REFERENCE, current=CURRENT)

    assert d.embedder is None and not [r for r in results if r.metric == EMBEDDING_METRIC]
    assert {r.model for r in results if r.metric == DATASET_METRIC} == {"a", "b"}
    only_b = await d.detect(store, reference=REFERENCE, current=CURRENT, model="b", model_version="v1")
    assert {(r.model, r.model_version) for r in only_b} == {("b", "v1")}
    per_version = DriftDetector(DriftSettings(embeddings=False, per_version=True), report_dir=tmp_path)
    versions = await per_version.detect(store, reference=REFERENCE, current=CURRENT)
    assert {(r.model, r.model_version) for r in versions if r.metric == DATASET_METRIC} == {("a", "v1"), ("b", "v1")}


async def test_window_features_guess_script_and_language_and_read_chat_user_turns(store: Store) -> None:
    texts = {"en": "How do I roast a chicken for my family?", "es": "¿Cómo puedo cocinar el arroz para la cena?",
             "fr": "Comment je fais une omelette pour le dîner?", "de": "Wie lange muss ich das Brot backen und was ist",
             "zh": "怎么做红烧肉?", "ja": "カレーの作り方を教えてください", "ko": "김치찌개 만드는 법을 알려주세요",
             "cyrillic": "Как приготовить борщ дома?", "unknown": "42 + 17 = ?"}
    await write_events(store, events(list(texts.values()), REFERENCE[0]))

    sample = await sample_window(store, TimeRange(*REFERENCE), Group("m"), rows=100, prompts=100)

    got = dict(zip(await prompt_texts(store, sample.prompts.event_ids), sample.frame["language"], strict=True))
    assert got == {text: lang for lang, text in texts.items()}
    frame = sample.frame.set_index(sample.frame["language"])
    assert frame.loc["zh", "script"] == "cjk" and frame.loc["zh", "cjk_share"] > 0.8
    assert frame.loc["cyrillic", "script"] == "cyrillic" and frame.loc["es", "script"] == "latin"
    assert frame.loc["en", "prompt_chars"] == len(texts["en"]) and sample.rows == len(texts)


async def test_column_tests_read_the_first_stat_rows_of_the_sample(store: Store, tmp_path: Path) -> None:
    await write_events(store, events(prompts(COOKING, N, 1), REFERENCE[0], seed=1)
                       + events(prompts(COOKING, N, 2), CURRENT[0], seed=2))
    settings = {"embeddings": False, "html_report": False, "max_rows": 1000}

    results = await DriftDetector(DriftSettings(**settings, stat_rows=120)).detect(  # type: ignore[arg-type]
        store, reference=REFERENCE, current=CURRENT)
    every = await DriftDetector(DriftSettings(**settings, stat_rows=None)).detect(  # type: ignore[arg-type]
        store, reference=REFERENCE, current=CURRENT)

    tested = results_by_metric(results)[("m", "", DATASET_METRIC)]
    assert msgspec.json.decode(tested.details)["sampled"] == [120, 120] and tested.sample_size == N
    assert msgspec.json.decode(results_by_metric(every)[("m", "", DATASET_METRIC)].details)["sampled"] == [N, N]


def request_frame(n: int, rng: np.random.Generator, *, shift: float = 0.0) -> pd.DataFrame:
    """Request features shaped like the real ones (lengths, token counts, language, guardrail action)."""
    langs = np.array(["en", "es", "fr", "de", "zh"])
    weights = np.array([0.6 - shift, 0.15, 0.1, 0.1, 0.05 + shift])
    chars = rng.lognormal(4.0 + shift, 0.6, n).round()
    return pd.DataFrame({"prompt_chars": chars, "tokens_in": (chars / 4).round(),
                         "tokens_out": rng.integers(20, 400, n).astype(float),
                         "language": rng.choice(langs, n, p=weights / weights.sum()),
                         "input_action": rng.choice(["allow", "redact", "block"], n, p=[0.96, 0.03, 0.01])})


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_column_tests_on_a_20k_subsample_decide_as_on_100k_rows(shift: float) -> None:
    rng = np.random.default_rng(7)
    reference, current = request_frame(100_000, rng), request_frame(40_000, rng, shift=shift)
    numerical, categorical = ["prompt_chars", "tokens_in", "tokens_out"], ["language", "input_action"]
    settings = DriftSettings()

    full = tabular_drift(reference, current, numerical, categorical, settings, None)
    sub = tabular_drift(reference[:20_000], current[:20_000], numerical, categorical, settings, None)

    drifted = {c: v["drifted"] for c, v in full.columns.items()}
    assert drifted == {c: v["drifted"] for c, v in sub.columns.items()}
    assert (full.drifted_share >= 0.5) == (sub.drifted_share >= 0.5) == (shift > 0)
    assert drifted["tokens_out"] is False and drifted["prompt_chars"] is (shift > 0)
    for c, v in full.columns.items():
        assert sub.columns[c]["score"] == pytest.approx(v["score"], abs=0.03)


def test_feature_frames_one_hot_finding_types_and_drop_constant_columns() -> None:
    ref = pd.DataFrame({"prompt_chars": [1, 2], "temperature": [0.7, 0.7], "script": ["latin", "latin"],
                        "guardrail_types": [["email"], []]})
    cur = pd.DataFrame({"prompt_chars": [3, 4], "temperature": [0.7, 0.7], "script": ["latin", "cjk"],
                        "guardrail_types": [["email", "api key"], ["api-key"]]})

    r, c, numerical, categorical, dropped = feature_frames(ref, cur)

    assert numerical == ["prompt_chars"] and dropped == ["temperature"]
    assert categorical == ["script", "guard_api_key", "guard_email"]
    assert r["guard_api_key"].tolist() == ["no", "no"] and c["guard_api_key"].tolist() == ["yes", "yes"]
    assert c["guard_email"].tolist() == ["yes", "no"]


def test_auc_null_quantile_matches_the_simulated_no_drift_distribution() -> None:
    rng = np.random.default_rng(0)
    n = 400
    # AUC of random scores on n/2 + n/2 held-out rows, via the Mann-Whitney rank sum
    ranks = np.argsort(np.argsort(rng.random((4000, n)), axis=1), axis=1) + 1
    half = n // 2
    aucs = (ranks[:, :half].sum(axis=1) - half * (half + 1) / 2) / (half * half)
    for q in (0.95, 0.99):
        assert auc_null_quantile(n, n, q) == pytest.approx(np.quantile(aucs, q), abs=0.005)


def test_only_the_newest_drift_reports_are_kept(tmp_path: Path) -> None:
    import os

    for i in range(5):
        (tmp_path / f"drift-m-all-{i}.html").write_text("x")
        os.utime(tmp_path / f"drift-m-all-{i}.html", ns=(i * 10**9, i * 10**9))
    (tmp_path / "other.html").write_text("kept")

    assert prune_reports(tmp_path, 2) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drift-m-all-3.html", "drift-m-all-4.html", "other.html"]


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_large_windows_are_projected_and_still_tell_a_topic_shift_from_none() -> None:
    rng = np.random.default_rng(1)
    topics = rng.standard_normal((12, 384))  # prompts are mixes of a few topics, plus noise
    new_topics = rng.standard_normal((3, 384))

    def prompts(n: int, basis: np.ndarray) -> np.ndarray:
        return _unit(rng.random((n, len(basis))) @ basis + 0.3 * rng.standard_normal((n, 384)))

    reference = prompts(12_000, topics)
    same = prompts(12_000, topics)
    shifted = np.concatenate([prompts(9_000, topics), prompts(3_000, new_topics)])
    settings = DriftSettings(embedding_reduce_above=20_000)  # 24k rows: projected on 32 axes first

    quiet, moved = embedding_drift(reference, same, settings), embedding_drift(reference, shifted, settings)
    assert not quiet["drifted"] and quiet["score"] < quiet["null_quantile"]
    assert moved["drifted"] and moved["score"] > 0.6


def test_novel_prompts_scores_a_bounded_sample_of_distinct_prompts() -> None:
    rng = np.random.default_rng(2)
    reference = _unit(rng.standard_normal((50, 8)))
    odd = _unit(-reference.mean(axis=0, keepdims=True))  # as far from the reference as it gets
    current = np.concatenate([reference[:3], odd, reference[3:6]])
    texts = ["a", "a", "b", "odd one", "c", "d", "e"]

    found = novel_prompts(reference, current, texts, k=2, sample=4)  # the first 4 distinct: a, b, odd one, c
    assert found[0]["prompt"] == "odd one"
    assert len(found) == 2 and {p["prompt"] for p in found} <= {"a", "b", "odd one", "c"}
    assert novel_prompts(reference, current, texts, k=2, sample=2)[0]["prompt"] in {"a", "b"}  # "odd one" unscored
