"""Request features for drift monitoring, computed in ClickHouse over a deterministic sample of a window.

Per request: prompt and response length, token counts, sampling parameters, the share of non-ASCII,
CJK, Cyrillic and Arabic characters, a dominant script, a cheap language guess (script-level for
CJK/Cyrillic/Arabic, a common-word vote among six Latin-script languages), guardrail actions and
finding types (one-hot). The prompt is the completion prompt or a chat's user turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from feedback.monitors.base import TimeRange
from feedback.monitors.embeddings import PROMPT_TEXT_SQL, PromptRows
from feedback.store.base import ParamValue, Store

NUMERICAL = ("prompt_chars", "response_chars", "tokens_in", "tokens_out", "temperature", "top_p",
             "max_tokens", "non_ascii_share", "cjk_share", "cyrillic_share", "arabic_share")
CATEGORICAL = ("operation", "script", "language", "input_action", "output_action")
# A cheap language guess for Latin-script prompts: the language whose common words occur most.
# Disjoint lists: each word votes for one language.
STOPWORDS = {
    "en": ("the", "and", "is", "are", "of", "to", "what", "how", "my", "you", "can", "do", "for", "with"),
    "es": ("el", "los", "las", "que", "y", "es", "por", "para", "cómo", "qué", "mi", "del", "pero"),
    "fr": ("le", "les", "des", "et", "est", "pour", "dans", "comment", "je", "vous", "une", "du", "pas"),
    "de": ("der", "die", "das", "und", "ist", "nicht", "ich", "wie", "was", "mit", "ein", "eine", "zu"),
    "pt": ("os", "não", "com", "como", "um", "uma", "meu", "você", "são", "é", "muito", "isso"),
    "it": ("il", "gli", "che", "è", "non", "per", "con", "come", "sono", "di", "una", "mio", "della"),
}
GUARD_PREFIX = "guard_"


@dataclass(frozen=True)
class Group:
    """Whose requests: one model, one version of it or all of them."""

    model: str
    model_version: str = ""  # "" = every version of the model


@dataclass
class WindowSample:
    """A window's sampled rows: their features (pandas) and the texts of the first ones (for embeddings)."""

    frame: pd.DataFrame
    prompts: PromptRows
    rows: int  # rows in the window (before sampling)


def _group_filter(group: Group) -> tuple[str, dict[str, ParamValue]]:
    sql, params = " AND model = {model:String}", {"model": group.model}
    if group.model_version:
        sql += " AND model_version = {model_version:String}"
        params["model_version"] = group.model_version
    return sql, params


# Served requests only: a shadow replay repeats a served prompt for a candidate and was served to nobody.
_WINDOW = ("ts >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') "
           "AND ts < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC') AND NOT shadow")


async def window_groups(store: Store, current: TimeRange, *, per_version: bool, model: str | None = None,
                        model_version: str | None = None) -> list[Group]:
    """The groups to evaluate: the one named, or every model (or model and version) seen in `current`."""
    if model is not None:
        return [Group(model, model_version or "")]
    by = "model, model_version" if per_version or model_version else "model, '' AS model_version"
    version = " AND model_version = {model_version:String}" if model_version else ""
    table = await store.query(
        f"SELECT DISTINCT {by} FROM inferences WHERE {_WINDOW}{version} ORDER BY 1, 2",
        {"start_ms": current.start_ms, "end_ms": current.end_ms, **({"model_version": model_version}
                                                                    if model_version else {})})
    return [Group(m, v) for m, v in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)]


_WORDS = [w for ws in STOPWORDS.values() for w in ws]
_LANG_OF_WORD = [i + 1 for i, ws in enumerate(STOPWORDS.values()) for _ in ws]
# One hash lookup per word (transform), then a count per language.
_WORD_LANGS = "arrayMap(w -> transform(w, [{}], [{}], 0), words)".format(
    ", ".join(f"'{w}'" for w in _WORDS), ", ".join(map(str, _LANG_OF_WORD)))
# Two steps, so the per-row feature work runs on the sample only: pick the window's sample by event-id
# hash (deterministic: the same prompts, hence cached embeddings, on every run), then read those rows.
# (A redelivered event not merged yet may take two of the sample's slots: a slightly smaller sample, no
# double count, and deduplicating 1M ids here would cost more than the whole feature query.)
_SAMPLE_IDS = ("SELECT event_id FROM inferences WHERE WINDOW_FILTER GROUP_FILTER "
               "ORDER BY cityHash64(event_id), event_id LIMIT {limit:UInt64}")
_FEATURES_SQL = r"""
WITH PROMPT_TEXT AS p, greatest(lengthUTF8(p), 1) AS pn,
     splitByRegexp('[^\\p{L}]+', lowerUTF8(p)) AS words, WORD_LANGS AS word_langs,
     arrayMap(i -> countEqual(word_langs, i), range(1, LANG_COUNT)) AS hits
SELECT
    lengthUTF8(p) AS prompt_chars, lengthUTF8(response) AS response_chars,
    tokens_in, tokens_out, temperature, top_p, max_tokens,
    (lengthUTF8(p) - countMatches(p, '[\\x00-\\x7F]')) / pn AS non_ascii_share,
    countMatches(p, '[\\p{Han}\\p{Hiragana}\\p{Katakana}\\p{Hangul}]') / pn AS cjk_share,
    countMatches(p, '\\p{Cyrillic}') / pn AS cyrillic_share,
    countMatches(p, '\\p{Arabic}') / pn AS arabic_share,
    multiIf(lengthUTF8(p) = 0, 'empty', cjk_share >= 0.3, 'cjk', cyrillic_share >= 0.3, 'cyrillic',
            arabic_share >= 0.3, 'arabic', non_ascii_share >= 0.3, 'other', 'latin') AS script,
    multiIf(script = 'cjk', multiIf(countMatches(p, '[\\p{Hiragana}\\p{Katakana}]') > 0, 'ja',
                                    countMatches(p, '\\p{Hangul}') > 0, 'ko', 'zh'),
            script != 'latin', script, arrayMax(hits) = 0, 'unknown',
            arrayElement([LANGUAGES], indexOf(hits, arrayMax(hits)))) AS language,
    operation, input_action, output_action, guardrail_types,
    WINDOW_ROWS AS window_rows
FROM inferences FINAL
WHERE WINDOW_FILTER GROUP_FILTER AND event_id IN (SAMPLE_IDS)
ORDER BY cityHash64(event_id), event_id
""".replace("WORD_LANGS", _WORD_LANGS).replace("LANG_COUNT", str(len(STOPWORDS) + 1)).replace(
    "LANGUAGES", ", ".join(f"'{lang}'" for lang in STOPWORDS)).replace("PROMPT_TEXT", PROMPT_TEXT_SQL)
# The prompts of the same sample (its first rows when the limit is smaller), for the embeddings: a query of
# its own, so the per-row features run only on the rows the tabular drift uses. Ids only: the texts are read
# for the prompts that have no cached embedding yet (`embed_prompts`) and for the novelty evidence.
_PROMPTS_SQL = """
SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms, WINDOW_ROWS AS window_rows
FROM inferences FINAL
WHERE WINDOW_FILTER GROUP_FILTER AND event_id IN (SAMPLE_IDS)
ORDER BY cityHash64(event_id), event_id
"""
_WINDOW_ROWS = "(SELECT count() FROM inferences FINAL WHERE WINDOW_FILTER GROUP_FILTER)"


def _sql(template: str, group_filter: str) -> str:
    return (template.replace("WINDOW_ROWS", _WINDOW_ROWS).replace("SAMPLE_IDS", _SAMPLE_IDS)
            .replace("WINDOW_FILTER", _WINDOW).replace("GROUP_FILTER", group_filter))


async def sample_window(store: Store, window: TimeRange, group: Group, *, rows: int, prompts: int) -> WindowSample:
    """A deterministic sample of the window's rows for `group`: features of up to `rows`, ids of up to `prompts`.

    The sample is picked by event-id hash, so it is the same on every run over the same window, and the
    smaller of the two is the first rows of the larger (a uniform subsample of it). The prompts carry
    the SQL that selects their ids (`PromptRows.id_query`), so the embedding cache read need not send them.
    """
    where, params = _group_filter(group)
    bounds = {"start_ms": window.start_ms, "end_ms": window.end_ms, **params}
    frame, window_rows = pd.DataFrame(), 0
    if rows > 0:
        table = await store.query(_sql(_FEATURES_SQL, where), {**bounds, "limit": rows})
        window_rows = int(table.column("window_rows")[0].as_py()) if table.num_rows else 0
        frame = table.drop_columns(["window_rows"]).to_pandas()
    texts = PromptRows([], [], [])
    if prompts > 0:
        head = await store.query(_sql(_PROMPTS_SQL, where), {**bounds, "limit": prompts})
        window_rows = int(head.column("window_rows")[0].as_py()) if head.num_rows else window_rows
        texts = PromptRows(head.column("event_id").to_pylist(), head.column("ts_ms").to_pylist(), None,
                           id_query=_sql(_SAMPLE_IDS, where), id_params={**bounds, "limit": prompts})
    return WindowSample(frame, texts, window_rows)


def _column_name(finding_type: str) -> str:
    return GUARD_PREFIX + re.sub(r"[^0-9a-zA-Z_]+", "_", finding_type).strip("_").lower()


def _guard_pairs(types: pd.Series) -> pd.DataFrame:
    """(row position, one-hot column) for every finding type of every row, each pair once."""
    found = pd.Series(types.to_numpy(), dtype=object).explode().dropna()
    names = {t: _column_name(t) for t in found.unique()}
    return pd.DataFrame({"row": found.index.to_numpy(dtype=np.intp),
                         "name": found.map(names).to_numpy(dtype=object)}).drop_duplicates()


def feature_frames(reference: pd.DataFrame, current: pd.DataFrame, *, max_guardrail_types: int = 20,
                   ) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str], list[str]]:
    """Both windows' feature frames with finding types one-hot encoded, and constant columns dropped.

    Returns (reference, current, numerical columns, categorical columns, dropped columns). A column
    holding one and the same value in both windows says nothing about drift (and breaks some tests).
    """
    # (row, column) pairs per frame: finding types that differ only in punctuation share one column.
    # Vectorised (explode), not a Python set per row: 140k rows took a second that way.
    pairs = [_guard_pairs(frame["guardrail_types"]) for frame in (reference, current)]
    counts = pd.concat([p["name"] for p in pairs]).value_counts()
    guards = sorted(counts.index, key=lambda c: (-counts[c], c))[:max_guardrail_types]
    out = []
    for frame, found in zip((reference, current), pairs, strict=True):
        frame = frame.drop(columns="guardrail_types")
        for name in guards:
            has = np.zeros(len(frame), dtype=bool)
            has[found["row"][found["name"] == name].to_numpy()] = True
            frame[name] = np.where(has, "yes", "no")
        out.append(frame)
    ref, cur = out
    dropped = [c for c in ref.columns if pd.concat([ref[c], cur[c]]).nunique(dropna=False) <= 1]
    numerical = [c for c in NUMERICAL if c in ref.columns and c not in dropped]
    categorical = [c for c in (*CATEGORICAL, *guards) if c in ref.columns and c not in dropped]
    return ref[numerical + categorical], cur[numerical + categorical], numerical, categorical, dropped

