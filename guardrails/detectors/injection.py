"""Prompt injection and jailbreak: maintained pattern sets matched on normalised text, with a score.

The text is folded to a skeleton (see `guardrails.normalise`), letter-spaced words are joined (the joined
text is the one view patterns are matched in: outside the spaced runs it is the skeleton itself), and
base64, hex and percent-encoded runs that decode to prose are normalised and scanned again
(depth-bounded). One Aho-Corasick pass finds trigger words and pattern heads: a pattern is tried only
when a word of each of its trigger groups occurs, and then only with `match` where one of its heads starts
a word. Evidence combines
per finding type as 1 - prod(1 - weight); encoded evidence counts a little more, since hiding is a signal.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable
from functools import reduce
from operator import itemgetter, or_
from pathlib import Path

import ahocorasick

from guardrails.detectors.injection_patterns import load_patterns
from guardrails.normalise import despace, encoded_segments, skeleton
from guardrails.rules import TextView
from guardrails.verdict import Finding

NAME = "injection"
TYPES = ("PROMPT_INJECTION", "JAILBREAK", "SYSTEM_PROMPT_EXTRACTION")
ENCODED_BONUS = 0.1
# A phrase in quotes is usually mentioned, not meant ("what does 'ignore previous instructions' mean?").
QUOTED_FACTOR = 0.4
_QUOTES = "'\"`"
# Word characters of the skeleton; everything else becomes a space in the view heads are looked up in.
_BOUNDARY = str.maketrans({chr(c): " " for c in range(128) if not chr(c).isalnum()})
_BOUNDARY_BYTES = bytes(c if c >= 128 or chr(c).isalnum() else ord(" ") for c in range(256))
_KEY = itemgetter(1)  # the key of an automaton hit (end, key)
# A pattern without heads is searched from this far before to this far after its first-group triggers.
WINDOW_BEFORE, WINDOW_AFTER = 120, 360


def _positions(text: str, literals: tuple[str, ...]) -> list[int]:
    """Sorted distinct positions where any of `literals` occurs in `text`."""
    found: set[int] = set()
    for lit in literals:
        at = text.find(lit)
        while at >= 0:
            found.add(at)
            at = text.find(lit, at + 1)
    return sorted(found)


def _mask(bits: Iterable[int]) -> int:
    """The integer with exactly the bits `bits` set (sets of small integers as one machine-friendly value)."""
    out = 0
    for b in bits:
        out |= 1 << b
    return out


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
        self.version, self.patterns, _ = load_patterns(path)
        self.decode_depth = decode_depth
        # Trigger words (anywhere): which patterns could match at all. Each (pattern, group) is one bit; a
        # pattern is gated in when the bits of its groups are all among the bits seen.
        gid: dict[tuple[int, int], int] = {}
        for i, p in enumerate(self.patterns):
            for g in range(len(p.groups)):
                gid[(i, g)] = len(gid)
        self._required = tuple(_mask(gid[(i, g)] for g in range(len(p.groups))) for i, p in enumerate(self.patterns))
        # One automaton over the boundary view (ASCII punctuation read as spaces, a space in front) finds both
        # kinds of key: a trigger anywhere (one holding punctuation or spaces is confirmed in the text
        # itself, since the view blurs them), a head only where it starts a word.
        words: dict[str, tuple[set[int], set[int]]] = {}
        for i, p in enumerate(self.patterns):
            for g, group in enumerate(p.groups):
                for word in group:
                    ids, windowed = words.setdefault(word, (set(), set()))
                    ids.add(gid[(i, g)])
                    if g == 0 and not p.heads:
                        windowed.add(i)  # patterns without heads are searched around these words
        heads: dict[str, set[int]] = {}
        for i, p in enumerate(self.patterns):
            for head in p.heads:
                heads.setdefault(" " + head.translate(_BOUNDARY), set()).add(i)
        # Per key, by the integer the automaton yields for it: the patterns it is a head of, its length, the
        # trigger group ids it is (a bit mask), the patterns searched around it, and the triggers to confirm
        # as (word, group id mask, patterns searched around it). Integers keep the per-hit work small: most
        # hits are common head words ("the", "how") that only matter once their pattern is gated in.
        plain: dict[str, tuple[set[int], set[int]]] = {}
        blurred: dict[str, list[tuple[str, int, tuple[int, ...]]]] = {}
        for word, (ids, windowed) in words.items():
            key = word.translate(_BOUNDARY)
            if any(c.isascii() and not c.isalnum() for c in word):
                blurred.setdefault(key, []).append((word, _mask(ids), tuple(sorted(windowed))))
            else:
                got = plain.setdefault(key, (set(), set()))
                got[0].update(ids)
                got[1].update(windowed)
        keys = sorted(heads.keys() | plain.keys() | blurred.keys())
        self._heads = tuple(tuple(sorted(heads.get(key, ()))) for key in keys)
        self._head_mask = tuple(_mask(heads.get(key, ())) for key in keys)
        self._length = tuple(len(key) for key in keys)
        self._trigger_mask = tuple(_mask(plain.get(key, ((), ()))[0]) for key in keys)
        self._windowed = tuple(tuple(sorted(plain.get(key, ((), ()))[1])) for key in keys)
        self._blurred = tuple(tuple(blurred.get(key, ())) for key in keys)
        # keys whose every hit needs a look: searched-around triggers and triggers to confirm
        self._special = frozenset(k for k in range(len(keys)) if self._windowed[k] or self._blurred[k])
        self._blurred_keys = frozenset(k for k in range(len(keys)) if self._blurred[k])
        self._windowed_patterns = _mask(i for i, p in enumerate(self.patterns) if not p.heads)
        self._keys = ahocorasick.Automaton()
        for k, key in enumerate(keys):
            self._keys.add_word(key, k)
        self._keys.make_automaton()

    def _search(self, i: int, text: str, ends: list[int]) -> re.Match[str] | None:
        """Pattern `i`'s first match in windows around its trigger occurrences (ends, ascending): the first
        window holding a match, its leftmost one (a `search` of each window, tried only at the pattern's
        leads when it has any)."""
        pattern = self.patterns[i]
        n = len(text)
        windows: list[tuple[int, int]] = []
        for end in ends:
            a, b = max(0, end - WINDOW_BEFORE), min(n, end + WINDOW_AFTER)
            if windows and a <= windows[-1][1]:
                windows[-1] = (windows[-1][0], b)
            else:
                windows.append((a, b))
        if not pattern.leads:
            for lo, hi in windows:
                if (m := pattern.regex.search(text, lo, hi)) is not None:
                    return m
            return None
        starts = _positions(text, pattern.leads)
        match = pattern.regex.match
        for lo, hi in windows:
            tried = lo - 1
            for h in starts[bisect_left(starts, lo):bisect_left(starts, hi)]:
                s = h
                if pattern.after_non_word:  # the match may start anywhere in the punctuation before the lead
                    while s > lo and not text[s - 1].isalnum():
                        s -= 1
                for at in range(max(s, tried + 1), h + 1):
                    if (m := match(text, at, hi)) is not None:
                        return m
                tried = h
        return None

    def _view_hits(self, text: str) -> dict[int, re.Match[str]]:
        """Pattern index -> its first match in one view; a pattern is tried only when all its groups occur."""
        view = " " + (text.encode("ascii").translate(_BOUNDARY_BYTES).decode("ascii") if text.isascii()
                      else text.translate(_BOUNDARY))
        # (key end in `view`, key); in `text` a trigger ends at `end - 1` and a head starts at `end - length + 1`
        hits = list(self._keys.iter(view))
        found: dict[int, re.Match[str]] = {}
        if not hits:
            return found
        distinct = set(map(_KEY, hits))
        length = self._length
        seen = reduce(or_, map(self._trigger_mask.__getitem__, distinct), 0)
        blurred = self._blurred
        confirm = self._blurred_keys.intersection(distinct)
        if confirm:  # triggers with punctuation or spaces: seen only where the text itself holds them
            for end, k in hits:
                if k in confirm:
                    n = length[k]
                    for word, ids, _around in blurred[k]:
                        if end >= n and text.startswith(word, end - n):
                            seen |= ids
        gated = [i for i, required in enumerate(self._required) if required & seen == required]
        if not gated:
            return found
        gated_mask = _mask(gated)
        first_group_ends: dict[int, list[int]] = {}
        if gated_mask & self._windowed_patterns:  # the trigger ends that gated head-less patterns need
            windowed = self._windowed
            for end, k in hits:
                if k not in self._special:
                    continue
                for i in windowed[k]:
                    first_group_ends.setdefault(i, []).append(end - 1)
                n = length[k]
                for word, _ids, around in blurred[k]:
                    if around and end >= n and text.startswith(word, end - n):
                        for i in around:
                            first_group_ends.setdefault(i, []).append(end - 1)
        starts: dict[int, list[int]] = {}
        head_mask, heads = self._head_mask, self._heads
        for end, k in hits:
            if head_mask[k] & gated_mask:
                for i in heads[k]:
                    if gated_mask >> i & 1:
                        starts.setdefault(i, []).append(end - length[k] + 1)
        for i in gated:
            pattern = self.patterns[i]
            if pattern.heads:
                for s in starts.get(i, ()):
                    m = pattern.regex.match(text, s)
                    if m is not None:
                        found[i] = m
                        break
            elif (m := self._search(i, text, first_group_ends[i])) is not None:
                found[i] = m
        return found

    def _hits(self, text: str, depth: int) -> dict[int, tuple[int, int, float]]:
        """Pattern index -> (start, end, weight) in `text`'s offsets, over every view of `text`."""
        hits: dict[int, tuple[int, int, float]] = {}
        skel = skeleton(text)
        spaced = despace(skel.text)
        view_text, maps = (skel.text, (skel,)) if spaced is None else (spaced.text, (spaced, skel))
        for i, m in self._view_hits(view_text).items():
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
