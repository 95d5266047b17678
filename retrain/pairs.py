"""Preference pairs and SFT examples from feedback rows: the functional core of dataset building.

Everything here is a pure function over plain rows (what `retrain.datasets` reads from the store), so the
rules are tested without a store and the same rows always give the same pairs, in the same order.

Sources of a `PreferencePair`:
- `preference`: pairwise feedback, the preferred inference's answer chosen, the other's rejected;
- `correction`: the user's corrected text chosen, the model's answer rejected;
- `rating`: an up-rated and a down-rated answer to the same (or a near-duplicate) prompt;
- `guardrail`: an answer the output guardrails blocked or redacted, rejected, against a safe answer to the
  same prompt, chosen.
SFT examples come from corrections and up-rated answers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

SOURCES = ("preference", "correction", "rating", "guardrail")
Message = tuple[str, str]  # (role, content)

_WS = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s?.!]+$")


def prompt_key(text: str) -> str:
    """The exact-match key of a prompt: lower case, whitespace collapsed, trailing `?.!` dropped."""
    return _TRAILING.sub("", _WS.sub(" ", text.strip()).lower())


@dataclass(frozen=True, slots=True)
class InferenceRow:
    """What pair building needs of one inference (redacted text only, as stored)."""

    event_id: str
    ts_ms: int
    tenant: str
    messages: tuple[Message, ...]  # the request: a chat, or one user message for a completion
    response: str
    status: str = "ok"
    output_action: str = "allow"
    model_version: str = ""

    @property
    def prompt_text(self) -> str:
        """The user turns joined by newlines: what a prompt is matched and embedded on."""
        return "\n".join(c for r, c in self.messages if r == "user")


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    """One feedback event, flattened."""

    event_id: str
    ts_ms: int
    tenant: str
    target_id: str
    kind: str
    thumbs: bool | None = None
    rating: float | None = None
    correction: str = ""
    preferred_id: str = ""
    other_id: str = ""


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A prompt with a chosen and a rejected answer, where it came from, and the events behind it."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str
    ts_ms: int
    tenant: str
    feedback_ids: tuple[str, ...]
    inference_ids: tuple[str, ...]

    def record(self) -> dict[str, object]:
        return {"prompt": [{"role": r, "content": c} for r, c in self.prompt], "chosen": self.chosen,
                "rejected": self.rejected, "source": self.source, "ts_ms": self.ts_ms, "tenant": self.tenant,
                "feedback_ids": list(self.feedback_ids), "inference_ids": list(self.inference_ids)}


@dataclass(frozen=True, slots=True)
class SftExample:
    """A prompt and a completion worth imitating."""

    prompt: tuple[Message, ...]
    completion: str
    source: str
    ts_ms: int
    tenant: str
    feedback_ids: tuple[str, ...]
    inference_ids: tuple[str, ...]

    def record(self) -> dict[str, object]:
        return {"prompt": [{"role": r, "content": c} for r, c in self.prompt], "completion": self.completion,
                "source": self.source, "ts_ms": self.ts_ms, "tenant": self.tenant,
                "feedback_ids": list(self.feedback_ids), "inference_ids": list(self.inference_ids)}


@dataclass(frozen=True, slots=True)
class PairRules:
    """How feedback turns into pairs: which sources, what counts as up/down, how near is a duplicate."""

    sources: tuple[str, ...] = SOURCES
    min_agreement: float = 0.75  # share of an inference's votes that must agree for it to count up or down
    rating_good: float = 4.0  # a rating >= this is an up vote
    rating_bad: float = 2.0  # a rating <= this is a down vote
    near_duplicate: float = 0.92  # cosine similarity of prompt embeddings that makes two prompts one
    max_pairs_per_prompt: int = 4
    sft_from_ratings: bool = True


@dataclass(frozen=True, slots=True)
class BuiltDataset:
    pairs: tuple[PreferencePair, ...]
    sft: tuple[SftExample, ...]
    dropped: dict[str, int] = field(default_factory=dict)  # why rows did not make pairs, counted


def _votes(feedback: Iterable[FeedbackRow], rules: PairRules) -> dict[str, list[tuple[int, FeedbackRow]]]:
    """Per target inference: (+1 | -1 | 0, row) for every thumbs and rating."""
    out: dict[str, list[tuple[int, FeedbackRow]]] = defaultdict(list)
    for f in feedback:
        if f.kind == "thumbs" and f.thumbs is not None:
            out[f.target_id].append((1 if f.thumbs else -1, f))
        elif f.kind == "rating" and f.rating is not None:
            v = 1 if f.rating >= rules.rating_good else -1 if f.rating <= rules.rating_bad else 0
            out[f.target_id].append((v, f))
    return out


def _verdict(votes: Sequence[tuple[int, FeedbackRow]], min_agreement: float) -> int:
    """+1 (up) or -1 (down) when at least `min_agreement` of the votes say so, else 0."""
    if not votes:
        return 0
    up = sum(1 for v, _ in votes if v > 0)
    down = sum(1 for v, _ in votes if v < 0)
    if up / len(votes) >= min_agreement and up > 0:
        return 1
    if down / len(votes) >= min_agreement and down > 0:
        return -1
    return 0


def group_prompts(rows: Sequence[InferenceRow], vectors: Mapping[str, np.ndarray] | None = None,
                  threshold: float = 0.92) -> dict[str, str]:
    """inference id -> prompt group id: exact `prompt_key` matches, merged further where the prompts'
    embeddings (L2-normalised, by inference id) have cosine similarity >= `threshold`.

    A group id is the smallest exact key in the group, so grouping does not depend on row order.
    """
    keys = {r.event_id: prompt_key(r.prompt_text) for r in rows}
    distinct = sorted(set(keys.values()))
    parent = {k: k for k in distinct}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    if vectors:
        by_key: dict[str, list[np.ndarray]] = defaultdict(list)
        for eid, k in keys.items():
            v = vectors.get(eid)
            if v is not None:
                by_key[k].append(np.asarray(v, np.float32))
        ks = sorted(by_key)
        if len(ks) > 1:
            m = np.stack([np.mean(by_key[k], axis=0) for k in ks])
            m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
            sim = m @ m.T
            for i, j in zip(*np.nonzero(np.triu(sim >= threshold, 1)), strict=True):
                a, b = find(ks[i]), find(ks[j])
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return {eid: find(k) for eid, k in keys.items()}


def build_pairs(inferences: Mapping[str, InferenceRow], feedback: Sequence[FeedbackRow], *,
                rules: PairRules = PairRules(), groups: Mapping[str, str] | None = None) -> BuiltDataset:
    """Preference pairs and SFT examples from `feedback` on `inferences` (by id), deduplicated, oldest first.

    `groups` maps inference id -> prompt group (from `group_prompts`); exact prompt keys when None.
    Feedback whose inference is missing is dropped (counted in `dropped`). Pure: same rows, same result.
    """
    if groups is None:
        groups = group_prompts(list(inferences.values()))
    pairs: list[PreferencePair] = []
    sft: list[SftExample] = []
    dropped: dict[str, int] = defaultdict(int)
    feedback = sorted(feedback, key=lambda f: (f.ts_ms, f.event_id))

    def usable(i: InferenceRow | None) -> bool:
        return i is not None and i.status == "ok" and bool(i.response.strip())

    for f in feedback:
        if f.kind == "preference" and "preference" in rules.sources:
            good, bad = inferences.get(f.preferred_id), inferences.get(f.other_id)
            if not (usable(good) and usable(bad)):
                dropped["preference_missing_inference"] += 1
                continue
            assert good is not None and bad is not None
            pairs.append(PreferencePair(good.messages, good.response, bad.response, "preference", f.ts_ms,
                                        f.tenant, (f.event_id,), (good.event_id, bad.event_id)))
        elif f.kind == "correction" and "correction" in rules.sources:
            target = inferences.get(f.target_id)
            if target is None or not f.correction.strip():
                dropped["correction_missing_inference"] += 1
                continue
            if target.response.strip():
                pairs.append(PreferencePair(target.messages, f.correction, target.response, "correction", f.ts_ms,
                                            f.tenant, (f.event_id,), (target.event_id,)))
            sft.append(SftExample(target.messages, f.correction, "correction", f.ts_ms, f.tenant, (f.event_id,),
                                  (target.event_id,)))

    votes = _votes(feedback, rules)
    if "rating" in rules.sources or rules.sft_from_ratings:
        ups: dict[str, list[InferenceRow]] = defaultdict(list)
        downs: dict[str, list[InferenceRow]] = defaultdict(list)
        for target_id in sorted(votes, key=lambda t: (max(f.ts_ms for _, f in votes[t]), t)):
            inf = inferences.get(target_id)
            if not usable(inf):
                dropped["rating_missing_inference"] += 1
                continue
            assert inf is not None
            v = _verdict(votes[target_id], rules.min_agreement)
            if v == 0:
                dropped["rating_disagreement"] += 1
                continue
            (ups if v > 0 else downs)[groups.get(target_id, prompt_key(inf.prompt_text))].append(inf)
            if v > 0 and rules.sft_from_ratings:
                ids = tuple(f.event_id for _, f in votes[target_id])
                sft.append(SftExample(inf.messages, inf.response, "rating", max(f.ts_ms for _, f in votes[target_id]),
                                      inf.tenant, ids, (inf.event_id,)))
        if "rating" in rules.sources:
            for g in sorted(set(ups) & set(downs)):
                combos = [(u, d) for d in downs[g] for u in ups[g] if u.tenant == d.tenant]
                for u, d in combos[: rules.max_pairs_per_prompt]:
                    ids = tuple(f.event_id for _, f in votes[u.event_id] + votes[d.event_id])
                    ts = max(f.ts_ms for _, f in votes[u.event_id] + votes[d.event_id])
                    pairs.append(PreferencePair(u.messages, u.response, d.response, "rating", ts, u.tenant, ids,
                                                (u.event_id, d.event_id)))

    if "guardrail" in rules.sources:
        safe: dict[str, list[InferenceRow]] = defaultdict(list)
        flagged: list[InferenceRow] = []
        for inf in sorted(inferences.values(), key=lambda i: (i.ts_ms, i.event_id)):
            if inf.output_action in ("block", "redact"):
                flagged.append(inf)
            elif usable(inf) and _verdict(votes.get(inf.event_id, []), rules.min_agreement) >= 0:
                safe[groups.get(inf.event_id, prompt_key(inf.prompt_text))].append(inf)
        for bad in flagged:
            g = groups.get(bad.event_id, prompt_key(bad.prompt_text))
            good = next((s for s in safe.get(g, ()) if s.tenant == bad.tenant), None)
            if good is None:
                dropped["guardrail_without_safe_answer"] += 1
                continue
            rejected = bad.response if bad.response.strip() else "[blocked]"
            pairs.append(PreferencePair(bad.messages, good.response, rejected, "guardrail", max(bad.ts_ms, good.ts_ms),
                                        bad.tenant, (), (good.event_id, bad.event_id)))

    return BuiltDataset(tuple(dedup_pairs(pairs)), tuple(dedup_sft(sft)), dict(sorted(dropped.items())))


def _prompt_id(prompt: tuple[Message, ...]) -> str:
    return "\x1e".join(f"{r}\x1f{prompt_key(c)}" for r, c in prompt)


def dedup_pairs(pairs: Iterable[PreferencePair]) -> list[PreferencePair]:
    """The first pair (oldest, then by event ids) per (prompt, chosen, rejected); pairs with chosen == rejected
    are dropped. Output is sorted by time."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for p in sorted(pairs, key=lambda p: (p.ts_ms, p.feedback_ids, p.inference_ids, p.source)):
        key = (_prompt_id(p.prompt), p.chosen.strip(), p.rejected.strip())
        if key[1] == key[2] or key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def dedup_sft(examples: Iterable[SftExample]) -> list[SftExample]:
    """The first example per (prompt, completion), sorted by time."""
    seen: set[tuple[str, str]] = set()
    out = []
    for e in sorted(examples, key=lambda e: (e.ts_ms, e.feedback_ids, e.inference_ids, e.source)):
        key = (_prompt_id(e.prompt), e.completion.strip())
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
    return out


def time_split(items: Sequence, eval_fraction: float) -> tuple[list, list]:
    """(train, eval): the newest `eval_fraction` of `items` (by `ts_ms`) is held out; items at the cut time
    all go to eval, so no instant is split across the two. `eval_fraction` 0 holds out nothing."""
    ordered = sorted(items, key=lambda x: x.ts_ms)
    if not ordered or eval_fraction <= 0:
        return list(ordered), []
    n_eval = max(1, round(len(ordered) * eval_fraction))
    if n_eval >= len(ordered):
        return [], list(ordered)
    cut = ordered[len(ordered) - n_eval].ts_ms
    return [x for x in ordered if x.ts_ms < cut], [x for x in ordered if x.ts_ms >= cut]
