"""Prompt injection and jailbreak: maintained pattern sets matched on normalised text, with a score.

The text is folded to a skeleton (see `guardrails.normalise`), letter-spaced words are joined, and base64,
hex and percent-encoded runs that decode to prose are normalised and scanned again (depth-bounded). A
pattern runs only near its trigger words (one Aho-Corasick pass finds them). Evidence combines per
finding type as 1 - prod(1 - weight); encoded evidence counts a little more, since hiding is a signal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import ahocorasick
import yaml

from guardrails.normalise import MappedText, despace, encoded_segments, skeleton
from guardrails.rules import TextView
from guardrails.verdict import Finding

NAME = "injection"
TYPES = ("PROMPT_INJECTION", "JAILBREAK", "SYSTEM_PROMPT_EXTRACTION")
_SEP = r"[\W_]+"
_GAP = r"(?:(?!(?:my|our)\b)[\w']{1,30}[\W_]+){0,3}"
ENCODED_BONUS = 0.1
# A phrase in quotes is usually mentioned, not meant ("what does 'ignore previous instructions' mean?").
QUOTED_FACTOR = 0.4
_QUOTES = "'\"`"
# A pattern is searched from this far before to this far after each of its trigger words.
WINDOW_BEFORE, WINDOW_AFTER = 240, 240


@dataclass(frozen=True, slots=True)
class InjectionPattern:
    id: str
    type: str
    weight: float
    regex: re.Pattern[str]
    triggers: tuple[str, ...]  # the pattern is searched around these
    also: tuple[tuple[str, ...], ...] = ()  # ... and only when a word of each of these groups occurs


def expand(notation: str) -> str:
    """The `regex` source for a pattern written in the data file's notation (spaces, `~`, l = i)."""
    body = notation.replace("l", "i").replace(" ?", "\x00").replace(" ", _SEP).replace("~", _GAP)
    return "(?<![a-z0-9])(?:" + body.replace("\x00", r"[\W_]*") + ")"


def load_patterns(path: Path | None = None) -> tuple[str, tuple[InjectionPattern, ...]]:
    """(version, patterns) from `path` or the bundled `guardrails/data/injection.yaml`.

    Raises ValueError naming the pattern id when a pattern is malformed or does not compile.
    """
    raw = path.read_text() if path else resources.files("guardrails").joinpath("data/injection.yaml").read_text()
    doc: dict[str, Any] = yaml.safe_load(raw)
    categories: dict[str, str] = doc["categories"]
    out = []
    for item in doc["patterns"]:
        pid = item.get("id", "?")
        try:
            type_ = categories[item["category"]]
            compiled = re.compile(expand(item["regex"]))
            weight = float(item["weight"])
        except (KeyError, re.error, TypeError, ValueError) as e:
            raise ValueError(f"injection pattern {pid!r}: {e}") from e
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"injection pattern {pid!r}: weight must be in (0, 1]")
        groups = item.get("triggers") or []
        if groups and not isinstance(groups[0], list):
            groups = [groups]
        folded = [tuple(skeleton(str(t)).text for t in g) for g in groups]
        out.append(InjectionPattern(pid, type_, weight, compiled, folded[0] if folded else (), tuple(folded[1:])))
    return str(doc.get("version", "0")), tuple(out)


def _quoted(text: str, start: int, end: int) -> bool:
    """True when the match opens right after a quote that closes before (or just after) its end."""
    if start == 0 or text[start - 1] not in _QUOTES:
        return False
    close = text.find(text[start - 1], start + 1, end + 3)
    return close > start + 3


class InjectionDetector:
    """Scores a text for prompt injection, jailbreak and system-prompt extraction; one finding per type."""

    name = NAME

    def __init__(self, path: Path | None = None, *, decode_depth: int = 2):
        self.version, self.patterns = load_patterns(path)
        self.decode_depth = decode_depth
        self._always = tuple(i for i, p in enumerate(self.patterns) if not p.triggers)
        self._triggers = ahocorasick.Automaton()
        index: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        for i, p in enumerate(self.patterns):
            for t in p.triggers:
                index.setdefault(t, ([], []))[0].append(i)
            for g, group in enumerate(p.also, start=1):
                for t in group:
                    index.setdefault(t, ([], []))[1].append((i, g))
        for word, (ids, groups) in index.items():
            self._triggers.add_word(word, (tuple(ids), tuple(groups)))
        self._triggers.make_automaton()

    def _search(self, i: int, text: str, ends: list[int]) -> re.Match[str] | None:
        """Pattern `i` searched only in windows around its trigger occurrences (ends, ascending)."""
        pattern = self.patterns[i].regex
        n = len(text)
        lo = hi = -1
        for end in ends:
            a, b = max(0, end - WINDOW_BEFORE), min(n, end + WINDOW_AFTER)
            if a <= hi:
                hi = b
                continue
            if hi >= 0 and (m := pattern.search(text, lo, hi)) is not None:
                return m
            lo, hi = a, b
        return pattern.search(text, lo, hi) if hi >= 0 else None

    def _hits(self, text: str, depth: int) -> dict[int, tuple[int, int, float]]:
        """Pattern index -> (start, end, weight) in `text`'s offsets, over every view of `text`."""
        hits: dict[int, tuple[int, int, float]] = {}
        skel = skeleton(text)
        views: list[tuple[str, list[MappedText]]] = [(skel.text, [skel])]
        spaced = despace(skel.text)
        if spaced is not None:
            views.append((spaced.text, [spaced, skel]))
        for view_text, maps in views:
            occurrences: dict[int, list[int]] = {i: [len(view_text)] for i in self._always}
            seen_groups: set[tuple[int, int]] = set()
            for end, (ids, groups) in self._triggers.iter(view_text):
                for i in ids:
                    occurrences.setdefault(i, []).append(end)
                seen_groups.update(groups)
            for i in sorted(occurrences):
                if i in hits or any((i, g) not in seen_groups for g in range(1, len(self.patterns[i].also) + 1)):
                    continue
                m = (self.patterns[i].regex.search(view_text) if i in self._always
                     else self._search(i, view_text, occurrences[i]))
                if m is None:
                    continue
                s, e = m.span()
                weight = self.patterns[i].weight
                if _quoted(view_text, s, e):
                    weight *= QUOTED_FACTOR
                for mapped in maps:
                    s, e = mapped.source_span(s, e)
                hits[i] = (s, e, weight)
        if depth > 0:
            for s, e, plain in encoded_segments(text):
                for i, (_s, _e, w) in self._hits(plain, depth - 1).items():
                    boosted = min(1.0, w + ENCODED_BONUS)
                    if i not in hits or hits[i][2] < boosted:
                        hits[i] = (s, e, boosted)
        return hits

    def scan(self, text: str, view: TextView | None = None) -> list[Finding]:
        """One finding per injection type with evidence, scored in [0, 1]; spans point into `text`."""
        by_type: dict[str, list[tuple[int, int, float]]] = {}
        for i, hit in self._hits(text, self.decode_depth).items():
            by_type.setdefault(self.patterns[i].type, []).append(hit)
        out = []
        for type_, hits in by_type.items():
            miss = 1.0
            for _s, _e, w in hits:
                miss *= 1.0 - w
            out.append(Finding(start=min(h[0] for h in hits), end=max(h[1] for h in hits), detector=NAME,
                               type=type_, score=round(1.0 - miss, 3)))
        out.sort()
        return out
