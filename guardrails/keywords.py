"""Anchored span rules: keyword sets, and patterns tried only where an anchor occurs.

A regex attempt at every position of a text is what makes many rules expensive. Here one pass finds the
anchors (keywords through an Aho-Corasick automaton over the folded text, or a cheap regex such as digit
runs), shared by every rule of a detector through the `TextView`, and each rule tries its pattern only at
those positions. `KeywordRule` reports whole-word occurrences of words and phrases (blocklists);
`AnchoredRule` matches a pattern at each anchor ("password", "phone", a digit run...). Both follow the
`PatternRule` contract: `scan` on a whole text, exact `advance` on a growing buffer.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import ahocorasick
import regex

from guardrails.rules import PatternRule, TextView, Validator, fold, pattern_starts, re_twin
from guardrails.verdict import Finding


def _is_word(c: str) -> bool:
    # "_" is a boundary: identifiers like aws_secret_access_key or DB_PASSWORD hold keywords as words
    return c.isalnum()


# ASCII word characters (`_is_word`) kept, every other byte a space ("?" included, which stands for any
# non-ASCII character once encoded with "replace").
_WORD_BYTES = bytes(c if c < 128 and chr(c).isalnum() else ord(" ") for c in range(256))


def word_view(text: str) -> str:
    """" " + `text` with each character but ASCII letters and digits read as a space: offsets shift by one.

    A term starts a word of an ASCII `text` exactly where " " + `word_view`'s reading of the term occurs
    and the term itself does (see `KeywordAnchors`); a non-ASCII letter reads as a space here, so there the
    character before an occurrence is checked too.
    """
    return " " + text.encode("ascii", "replace").translate(_WORD_BYTES).decode("ascii")


class KeywordAnchors:
    """Whole-word starts of terms (case-insensitive) in the folded text, each term in a named group so
    several rules can share one automaton pass."""

    def __init__(self, groups: dict[str, Iterable[str]]):
        self.auto = ahocorasick.Automaton()
        self.maxlen = 0
        firsts: set[str] = set()
        keys: dict[str, set[str]] = {}
        for group, terms in groups.items():
            for term in terms:
                key = fold(term.strip())
                if key:
                    keys.setdefault(key, set()).add(group)
        # Searched: each term as `word_view` reads it, after the space that marks a word start. Nearly every
        # character of a text then fails at the root, which has one child (pyahocorasick looks a character
        # up in a node's children one by one: a root with forty children costs three times as much per
        # character). `auto`, the terms themselves, answers prefix questions for streams (`pending`).
        marked: dict[str, list[tuple[str, int, frozenset[str], bool]]] = {}
        for key, names in keys.items():
            self.auto.add_word(key, (len(key), frozenset(names)))
            self.maxlen = max(self.maxlen, len(key))
            firsts.add(key[0])
            # (term, length, groups, whether the view may blur it: a term with other characters than
            # ASCII letters and digits is confirmed in the folded text)
            marked.setdefault(word_view(key), []).append(
                (key, len(key), frozenset(names), not (key.isascii() and key.isalnum())))
        self.firsts = frozenset(firsts)
        self.empty = self.maxlen == 0
        self._marked = ahocorasick.Automaton()
        for key, terms in marked.items():
            self._marked.add_word(key, tuple(terms))
        if not self.empty:
            self.auto.make_automaton()
            self._marked.make_automaton()
        self._start_chars = frozenset(c for c in map(chr, range(128)) if fold(c) in self.firsts)

    def _found(self, view: TextView) -> list[tuple[int, int, frozenset[str]]]:
        """(start, end, groups) of every term starting a word of the folded text at or after `view.start`,
        in order of end (longest first at one end): what the plain automaton finds, less non-word starts."""
        found = view.memo.get(self)
        if found is None:
            found = []
            if not self.empty:
                f = view.folded
                marked = view.memo.get(word_view)
                if marked is None:
                    marked = view.memo[word_view] = word_view(f)
                exact = f.isascii()
                # a key ending at `end` in the marked view is a term at f[end - length:end]
                for end, terms in self._marked.iter(marked, view.start):  # type: ignore[arg-type]
                    for term, length, names, blurred in terms:
                        s = end - length
                        if (not blurred or f.startswith(term, s)) and (exact or s == 0 or not _is_word(f[s - 1])):
                            found.append((s, end, names))
            view.memo[self] = found
        return found  # type: ignore[return-value]

    def spans(self, view: TextView, group: str) -> list[tuple[int, int]]:
        """(start, end) of every occurrence of a `group` term, overlaps included, starting a word."""
        return [(s, e) for s, e, names in self._found(view) if group in names]

    def starts(self, view: TextView, group: str) -> list[int]:
        """Sorted distinct starts of `group`'s occurrences (every group's list built in one pass, memoised)."""
        key = (self, "starts")
        by_group: dict[str, list[int]] | None = view.memo.get(key)  # type: ignore[assignment]
        if by_group is None:
            collected: dict[str, set[int]] = {}
            for s, _e, names in self._found(view):
                for name in names:
                    collected.setdefault(name, set()).add(s)
            by_group = view.memo[key] = {name: sorted(found) for name, found in collected.items()}
        return by_group.get(group, [])

    def start_chars(self) -> frozenset[str]:
        """The ASCII characters a term can begin with."""
        return self._start_chars

    def last_event(self, view: TextView) -> int:
        """The last position (from `view.start`) where any group's term starts or the end of the text is a
        prefix of a term; -1 when none: a rule resuming after it has nothing to try and nothing pending."""
        found = self._found(view)
        last = max((s for s, _e, _n in found), default=-1)
        self.pending(view, view.start)  # fills the memo
        tail: list[int] = view.memo[(self, "pending")]  # type: ignore[assignment]
        return max(last, tail[-1]) if tail else last

    def pending(self, view: TextView, pos: int) -> int:
        """The first position >= `pos` where the end of the text is a prefix of a term (len if none)."""
        key = (self, "pending")
        found = view.memo.get(key)
        if found is None:  # every such position in the text's last `maxlen` characters, shared by all rules
            f = view.folded
            n = len(f)
            # only where a word starts: a term must (see `_found`)
            found = view.memo[key] = [s for s in range(max(view.start, n - self.maxlen), n)
                                      if f[s] in self.firsts and not (s > 0 and _is_word(f[s - 1]))
                                      and self.auto.match(f[s:n])]
        for s in found:  # type: ignore[attr-defined]
            if s >= pos:
                return s
        return len(view.text)


class RegexAnchors:
    """Starts of the matches of a short, local `pattern` (whether it matches at a position depends only on
    the `max_len` characters from it, e.g. a digit not preceded by a digit).

    `shape`, when given, is the same pattern over an ASCII text's byte shape (`TextView.shape`): searched
    there instead, with `re` over bytes, which skips to its first literal at C speed.
    """

    def __init__(self, pattern: str, max_len: int, *, shape: bytes | None = None):
        self.regex = regex.compile(pattern)
        self._shape = re.compile(shape) if shape else None
        self.maxlen = max_len
        _prefix, first = pattern_starts(pattern)
        self._first = regex.compile(first) if first else None
        self._first_last = regex.compile("(?r)" + first) if first else None
        self._start_chars = None if self._first is None else \
            frozenset(c for c in map(chr, range(128)) if self._first.match(c))

    def spans(self, view: TextView, group: str = "") -> list[tuple[int, int]]:
        got = view.memo.get(self)
        if got is None:
            shape = view.shape if self._shape is not None else None
            found = self._shape.finditer(shape, view.start) if shape is not None else \
                self.regex.finditer(view.text, view.start)  # type: ignore[union-attr]
            got = view.memo[self] = [m.span() for m in found]
        return got  # type: ignore[return-value]

    def starts(self, view: TextView, group: str = "") -> list[int]:
        """Sorted starts of the anchors (memoised)."""
        key = (self, "starts")
        got = view.memo.get(key)
        if got is None:
            got = view.memo[key] = [s for s, _e in self.spans(view)]
        return got  # type: ignore[return-value]

    def start_chars(self) -> frozenset[str] | None:
        """The ASCII characters an anchor can begin with (None: can't tell)."""
        return self._start_chars

    def last_event(self, view: TextView) -> int:
        """The last position (from `view.start`) where an anchor or a pending anchor may start: the last
        character that can begin one (-1 when none, len(text) when that cannot be told)."""
        if self._first_last is None:
            return len(view.text)
        m = self._first_last.search(view.text, view.start)
        return -1 if m is None else m.start()

    def pending(self, view: TextView, pos: int) -> int:
        """The first position >= `pos` whose anchor may still change with more text: one that could start
        an anchor within the last `max_len` characters."""
        text = view.text
        n = len(text)
        lo = max(pos, n - self.maxlen)
        if self._first is None:
            return lo
        m = self._first.search(text, lo)
        return m.start() if m is not None else n


Anchors = KeywordAnchors | RegexAnchors


class KeywordRule:
    """Whole-word, case-insensitive occurrences of any of `terms`; overlapping ones all reported.

    A word boundary is anything but a letter or digit (so "_" separates words, as in identifiers).
    """

    def __init__(self, detector: str, type_: str, terms: Iterable[str], score: float = 1.0):
        self.detector, self.type, self.score = detector, type_, score
        self.anchors = KeywordAnchors({type_: terms})
        self.width = self.anchors.maxlen + 1

    def _found(self, view: TextView, pos: int, limit: int) -> list[Finding]:
        f = view.folded
        n = len(f)
        out = []
        for s, e in self.anchors.spans(view, self.type):
            if s < pos or s >= limit:
                continue
            if _is_word(f[e - 1]) and e < n and _is_word(f[e]):
                continue
            out.append(Finding(start=s, end=e, detector=self.detector, type=self.type, score=self.score))
        out.sort()
        return out

    def start_chars(self) -> frozenset[str] | None:
        return self.anchors.start_chars()

    def scan(self, view: TextView) -> list[Finding]:
        """Every whole-word occurrence in the text."""
        return self._found(view, 0, len(view.text) + 1)

    def advance(self, view: TextView, pos: int, finished: bool) -> tuple[list[Finding], int]:
        """As `PatternRule.advance`: final occurrences starting at or after `pos`, and the resume point."""
        frontier = len(view.text) if finished else self.anchors.pending(view, pos)
        return self._found(view, pos, frontier), frontier


def anchor_starts(view: TextView, anchors: Anchors, group: str, first: str = "") -> list[int]:
    """Sorted starts of `group`'s anchors whose first character is in `first` (any, when empty); memoised in
    the view, so every rule with the same anchors, group and first characters shares one list."""
    if not first:
        return anchors.starts(view, group)
    key = (anchors, group, first)
    starts = view.memo.get(key)
    if starts is None:
        text = view.text
        starts = view.memo[key] = [s for s in anchors.starts(view, group) if text[s] in first]
    return starts  # type: ignore[return-value]


class AnchoredRule:
    """`pattern` tried (with `match`) at every anchor start (of `group`, for keyword anchors).

    The pattern must start by matching the anchor itself (and, given `first`, with one of its characters);
    `validate`, the value group `v` and the `requires*` prefilters work as in `PatternRule`.
    """

    def __init__(self, detector: str, type_: str, anchors: Anchors, pattern: str, *, group: str = "",
                 score: float = 0.9, validate: Validator | None = None, requires: tuple[str, ...] = (),
                 requires_shape: tuple[bytes, ...] = (), first: str = ""):
        self.detector, self.type, self.group = detector, type_, group
        self._first = first  # when set, the characters a match can start with: skips hopeless anchors
        self._rule = PatternRule(detector, type_, pattern=pattern, score=score, validate=validate,
                                 requires=requires, requires_shape=requires_shape)
        self.anchors = anchors
        self.regex: regex.Pattern[str] = self._rule.regex
        self._re = self._rule._re
        self.width = self._rule.width

    def _starts(self, view: TextView, pos: int, limit: int) -> list[int]:
        starts = anchor_starts(view, self.anchors, self.group, self._first)
        if pos == 0 and limit > len(view.text):
            return starts  # type: ignore[return-value]
        return starts[bisect_left(starts, pos):bisect_left(starts, limit)]  # type: ignore[arg-type]

    def start_chars(self) -> frozenset[str] | None:
        return self.anchors.start_chars()

    def scan(self, view: TextView) -> list[Finding]:
        """Validated matches at every anchor of the whole text."""
        if not self._rule.applies(view):
            return []
        out = []
        starts = self._starts(view, 0, len(view.text) + 1)
        if not starts:
            return out
        match = (self._re if self._re is not None and view.re_safe else self.regex).match
        for s in starts:
            m = match(view.text, s)
            if m is not None:
                finding = self._rule.finding(m)
                if finding is not None:
                    out.append(finding)
        return out

    def advance(self, view: TextView, pos: int, finished: bool) -> tuple[list[Finding], int]:
        """As `PatternRule.advance`; an anchor whose attempt might still change holds the frontier."""
        buf = view.text
        frontier = len(buf) if finished else self.anchors.pending(view, pos)
        out = []
        match = (self._re if self._re is not None and view.re_safe else self.regex).match
        for s in self._starts(view, pos, frontier):
            if finished or s + self.width <= len(buf):
                m = match(buf, s)
            else:
                m = self.regex.match(buf, s, partial=True)
                if m is not None and (m.partial or not self._rule.settled(buf, s)):
                    frontier = s
                    break
            if m is not None:
                finding = self._rule.finding(m)
                if finding is not None:
                    out.append(finding)
        return out, frontier


_NAMED_GROUP = regex.compile(r"\(\?P<\w+>")


class AnchorProbe:
    """Anchored rules that share anchors and group, tried together on a whole text.

    Each rule's pattern sits in a capturing look-ahead of one combined pattern (a failed look-ahead falls
    through to an empty branch; a final condition fails when none matched), so one `match` per anchor tells
    which rules match there, and only those are matched again for their own match object. A look-ahead
    captures exactly what the pattern's own `match` at that position would.
    """

    def __init__(self, rules: Sequence[AnchoredRule]):
        self.rules = tuple(rules)
        body = "".join(f"(?:(?=(?P<r{i}>{_NAMED_GROUP.sub('(?:', r.regex.pattern)}))|)"
                       for i, r in enumerate(self.rules))
        none = "".join(f"(?(r{i})|" for i in range(len(self.rules))) + "(?!)" + ")" * len(self.rules)
        self.regex = regex.compile(body + none, regex.V0)
        self._re = re_twin(body + none) if all(r._re is not None for r in self.rules) else None
        self._groups = tuple(self.regex.groupindex[f"r{i}"] for i in range(len(self.rules)))
        if self._re is not None and tuple(self._re.groupindex[f"r{i}"] for i in range(len(self.rules))) != self._groups:
            self._re = None
        # per rule, for the `regex` and the `re` probe: (index, first characters, match, finding, group)
        self._tries = {fast: tuple((k, r._first, (r._re if fast else r.regex).match, r._rule.finding, self._groups[k])
                                   for k, r in enumerate(self.rules))
                       for fast in (False, True) if not fast or self._re is not None}

    def scan(self, view: TextView) -> list[list[Finding]]:
        """Each rule's `scan(view)`, in rule order."""
        rules = self.rules
        out: list[list[Finding]] = [[] for _ in rules]
        live = [r._rule.applies(view) for r in rules]
        if not any(live):
            return out
        starts = anchor_starts(view, rules[0].anchors, rules[0].group)
        if not starts:
            return out
        text = view.text
        fast = self._re is not None and view.re_safe
        probe = self._re.match if fast else self.regex.match  # type: ignore[union-attr]
        tried = [t for t in self._tries[fast] if live[t[0]]]
        for s in starts:
            m = probe(text, s)
            if m is None:
                continue
            regs = m.regs
            for k, first, match, finding, g in tried:
                if regs[g][0] >= 0 and (not first or text[s] in first):
                    f = finding(match(text, s))
                    if f is not None:
                        out[k].append(f)
        return out
