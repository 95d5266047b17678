"""Span rules: the unit every span detector is made of, usable on a whole text or incrementally on a stream.

A `PatternRule` is one bounded regular expression plus a pure validator (`guardrails.keywords` holds the
Aho-Corasick based rules). Every rule can scan a whole text (`scan`) and advance over a growing
buffer (`advance`), and `advance` is exact: it reports a finding only once no later text can change it,
and it reports exactly the findings `scan` would report on the whole text. That is what lets the stream
guard emit early without ever letting a match escape split across chunks.

How a pattern rule knows an attempt is final: the pattern is parsed once to learn the most characters an
attempt can examine (`width`, so unbounded patterns are refused), the characters a match can consume, and
the literal prefix or first characters a match starts with. An attempt at `s` is settled when
`s + width <= n` or a character it cannot consume lies between `s` and the buffer's end; matches starting
where attempts are settled are final, and the stream resumes at the first place in the unsettled tail where
an attempt could begin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import regex

from guardrails.regex_shape import LOOKBACK, BadPattern, UnboundedPattern, pattern_shape, pattern_starts
from guardrails.verdict import Finding

__all__ = ["LOOKBACK", "BadPattern", "PatternRule", "TextView", "UnboundedPattern", "Validator", "fold",
           "pattern_shape", "pattern_starts"]

# (type, score) or (type, score, start, end) for an accepted match (the span, in match-string offsets,
# when the validator narrows it), None to reject it.
Validator = Callable[["regex.Match[str]"], "tuple[str, float] | tuple[str, float, int, int] | None"]
_HAS_DIGIT = regex.compile(r"\d")
_HAS_DIGIT_RE = re.compile(r"\d")


# Byte "shapes" of ASCII text for C-speed prefilters (`bytes.translate` then substring tests): digits -> d,
# upper-case letters -> U, the separators number patterns use -> s, other printable -> x, controls -> c.
_SHAPE = bytes(
    ord("d") if chr(c).isdigit() else ord("U") if chr(c).isupper() else ord("s") if chr(c) in " .-/"
    else ord("c") if (c < 32 and c not in (9, 10, 13)) or c == 127 else ord("x") for c in range(256))

_LOOSE_SHAPE = _SHAPE[:ord("?")] + b"n" + _SHAPE[ord("?") + 1:]
_RE_UNSAFE = (b"\x1c", b"\x1d", b"\x1e", b"\x1f")


def re_twin(pattern: str, flags: int = 0) -> re.Pattern[str] | None:
    """`pattern` compiled by the `re` module, equal to `regex` on `re_safe` texts and cheaper per `match` at
    a given position (scans stay with `regex`, which skips ahead to a required literal where `re` tries
    every position); None when `re` cannot compile it (a variable-width look-behind, say) or flags are set."""
    if flags:
        return None
    try:
        return re.compile(pattern)
    except re.error:
        return None


class TextView:
    """One text and what several rules derive from it, computed once: fold, shape, anchor positions."""

    __slots__ = ("_ascii", "_digit", "_folded", "_loose", "_re_safe", "_shape", "_shaped", "memo", "start", "text")

    def __init__(self, text: str, folded: str | None = None, start: int = 0):
        self.text = text
        self.start = start  # anchors are only needed from here on (a stream's earliest resume point)
        self._folded = folded
        self._digit: bool | None = None
        self._shape: bytes | None = None
        self._shaped = False
        self._loose: bytes | None = None
        self._ascii: bytes | bool | None = False  # False: not computed yet
        self._re_safe: bool | None = None
        self.memo: dict[object, object] = {}

    @property
    def folded(self) -> str:
        if self._folded is None:
            self._folded = fold(self.text)
        return self._folded

    @property
    def shape(self) -> bytes | None:
        """The text's byte shape (see _SHAPE), or None for non-ASCII text (no shape prefilter applies)."""
        if not self._shaped:
            ascii = self.ascii
            self._shape = None if ascii is None else ascii.translate(_SHAPE)
            self._shaped = True
        return self._shape

    @property
    def ascii(self) -> bytes | None:
        """The text as ASCII bytes (None when it is not ASCII), for byte-table searches."""
        if self._ascii is False:
            self._ascii = self.text.encode("ascii") if self.text.isascii() else None
        return self._ascii  # type: ignore[return-value]

    @property
    def re_safe(self) -> bool:
        """True when the `re` module matches every rule pattern here exactly as `regex` does: the text is
        ASCII (where the two agree on \\w, \\d and case) and holds none of \\x1c-\\x1f (which only `re`
        counts as \\s)."""
        if self._re_safe is None:
            shape, ascii = self.shape, self.ascii  # \x1c-\x1f are controls: a shape without "c" has none
            self._re_safe = shape is not None and ascii is not None and \
                (b"c" not in shape or not any(c in ascii for c in _RE_UNSAFE))
        return self._re_safe

    @property
    def loose_shape(self) -> bytes:
        """The byte shape of any text, each non-ASCII character (and "?") read as "n", "could be anything":
        a shape pattern that allows "n" wherever the real pattern allows a non-ASCII character finds a
        superset of the real pattern's match starts (see guardrails/candidates.py)."""
        if self._loose is None:
            ascii = self.ascii
            self._loose = (ascii if ascii is not None else self.text.encode("ascii", "replace")).translate(_LOOSE_SHAPE)
        return self._loose

    def contains(self, probe: re.Pattern[str]) -> bool:
        """Whether `probe` occurs in the text (memoised, so rules sharing a probe search once)."""
        got = self.memo.get(probe)
        if got is None:
            got = self.memo[probe] = probe.search(self.text) is not None
        return got  # type: ignore[return-value]

    @property
    def has_digit(self) -> bool:
        if self._digit is None:
            shape = self.shape  # ASCII digits are the "d"s of the shape; other texts: a Unicode \d search
            self._digit = b"d" in shape if shape is not None else _HAS_DIGIT.search(self.text) is not None
        return self._digit

    def may_contain(self, shapes: tuple[bytes, ...]) -> bool:
        """False only when the text is ASCII and its shape holds none of `shapes` (memoised per `shapes`)."""
        got = self.memo.get(shapes)
        if got is None:
            shape = self.shape
            got = self.memo[shapes] = shape is None or any(s in shape for s in shapes)
        return got  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class PatternRule:
    """One bounded regular expression for one detector; the span is group `v` when the pattern has one.

    `requires` / `requires_lower` are literal substrings of which every match contains at least one (in the
    text / in `fold(text)`), `requires_digit` / `requires_nonascii` say every match holds such a character,
    `requires_re` is a (Python `re`) pattern every match contains, `requires_shape` byte shapes of which
    an ASCII text must contain one (see TextView.shape): a whole-text scan skips the rule when one of these
    cannot hold. `candidates`, when given, yields in increasing order every position where a match could
    start (a superset, found by C-speed searches; see guardrails/candidates.py): a whole-text scan tries
    the pattern only there, with exactly `finditer`'s results. Patterns given candidates never match ''.
    """

    detector: str
    type: str
    pattern: str
    score: float = 0.9
    validate: Validator | None = None
    requires: tuple[str, ...] = ()
    requires_lower: tuple[str, ...] = ()
    requires_digit: bool = False
    requires_nonascii: bool = False
    requires_re: re.Pattern[str] | None = None
    requires_shape: tuple[bytes, ...] = ()
    flags: int = 0
    candidates: Callable[[TextView], Iterable[int]] | None = None
    regex: regex.Pattern[str] = field(init=False)
    width: int = field(init=False)
    lookahead: int = field(init=False)
    _has_value: bool = field(init=False)
    _stop: regex.Pattern[str] | None = field(init=False)
    _prefix: str = field(init=False)
    _first: regex.Pattern[str] | None = field(init=False)
    _stop_bytes: bytes | None = field(init=False)
    _first_bytes: bytes | None = field(init=False)
    _start_chars: frozenset[str] | None = field(init=False)
    _re: re.Pattern[str] | None = field(init=False)

    def __post_init__(self) -> None:
        width, lookahead, stopper = pattern_shape(self.pattern)
        set_ = object.__setattr__
        set_(self, "regex", regex.compile(self.pattern, self.flags | regex.V0))
        set_(self, "_re", re_twin(self.pattern, self.flags))
        set_(self, "width", width + 1)  # +1: `\b`/`$`-style checks peek one past what they examine
        set_(self, "lookahead", lookahead)
        set_(self, "_has_value", "v" in self.regex.groupindex)
        set_(self, "_stop", regex.compile("(?r)" + stopper, regex.IGNORECASE) if stopper else None)
        prefix, first = pattern_starts(self.pattern)
        set_(self, "_prefix", prefix if len(prefix) >= 2 and not self.flags & regex.IGNORECASE else "")
        set_(self, "_first", regex.compile(first, regex.IGNORECASE) if first else None)
        # The same two tests as byte tables over ASCII ("S": a stopper, "F": a possible first character), so
        # a stream's ASCII buffer is searched with `bytes.rfind`/`find` instead of a regex call per rule.
        set_(self, "_stop_bytes", _byte_table(stopper, b"S") if stopper else None)
        set_(self, "_first_bytes", _byte_table(first, b"F") if first else None)
        set_(self, "_start_chars", frozenset(self._prefix[0]) if self._prefix else None if self._first is None else
             frozenset(c for c in map(chr, range(128)) if self._first.match(c)))

    def finding(self, m: regex.Match[str], base: int = 0) -> Finding | None:
        start, end = m.span("v") if self._has_value and m.start("v") >= 0 else m.span()
        if self.validate is None:
            type_, score = self.type, self.score
        else:
            got = self.validate(m)
            if got is None:
                return None
            if len(got) == 4:
                type_, score, start, end = got  # type: ignore[misc]
            else:
                type_, score = got  # type: ignore[misc]
        return Finding(start=start + base, end=end + base, detector=self.detector, type=type_, score=score)

    def applies(self, view: TextView) -> bool:
        """Cheap necessary condition: False means no match can exist anywhere in the text."""
        text = view.text
        if self.requires_nonascii and text.isascii():
            return False
        requires = self.requires
        if requires and (requires[0] not in text if len(requires) == 1 else not any(r in text for r in requires)):
            return False  # (one literal, the common case, tested without a generator)
        if self.requires_lower and not any(r in view.folded for r in self.requires_lower):
            return False
        if self.requires_digit and not view.has_digit:
            return False
        if self.requires_shape and not view.may_contain(self.requires_shape):
            return False
        return self.requires_re is None or view.contains(self.requires_re)

    def _may_match_from(self, view: TextView, pos: int) -> bool:
        """`applies` for the text from `pos` on (no shape test): False means no match starts at or after it."""
        text = view.text
        if self.requires and all(text.find(r, pos) < 0 for r in self.requires):
            return False
        if self.requires_nonascii and text.isascii():
            return False
        if self.requires_digit and (_HAS_DIGIT_RE if view.re_safe else _HAS_DIGIT).search(text, pos) is None:
            return False
        if self.requires_lower and all(view.folded.find(r, pos) < 0 for r in self.requires_lower):
            return False
        return self.requires_re is None or self.requires_re.search(text, pos) is not None

    def scan(self, view: TextView) -> list[Finding]:
        """Every validated match in the whole text of `view`."""
        if not self.applies(view):
            return []
        out = []
        if self.candidates is None:  # `regex` scans: it skips to a required literal, `re` tries every position
            for m in self.regex.finditer(view.text):
                f = self.finding(m)
                if f is not None:
                    out.append(f)
            return out
        text, done = view.text, 0
        match = (self._re if self._re is not None and view.re_safe else self.regex).match
        for s in self.candidates(view):
            if s >= done and (m := match(text, s)) is not None:
                done = m.end()  # as finditer: the next match starts after this one
                f = self.finding(m)
                if f is not None:
                    out.append(f)
        return out

    def settled(self, buf: str, start: int) -> bool:
        """True when an attempt starting at `start` cannot depend on text after the end of `buf`."""
        n = len(buf)
        if start + self.width <= n:
            return True
        return self._stop is not None and start < n - self.lookahead and \
            self._stop.search(buf, start, n - self.lookahead) is not None

    def settled_from(self, buf: str, ascii: bytes | None = None) -> int:
        """The first position whose attempt may still depend on text after the end of `buf`.

        Settledness is a prefix: an attempt at `s` is settled when `s + width <= n`, or when a character no
        match can consume lies in `buf[s:n - lookahead]` (the match must end before it). `ascii`: `buf` as
        ASCII bytes, when it is ASCII.
        """
        n = len(buf)
        lo = n - self.width + 1
        if self._stop is not None and lo < n - self.lookahead:
            if ascii is not None and self._stop_bytes is not None:
                at = ascii.translate(self._stop_bytes).rfind(b"S", max(lo, 0), n - self.lookahead)
                if at >= 0:
                    lo = at + 1
            else:
                stop = self._stop.search(buf, max(lo, 0), n - self.lookahead)
                if stop is not None:
                    lo = stop.start() + 1
        return max(lo, 0)

    def start_chars(self) -> frozenset[str] | None:
        """The ASCII characters an attempt can begin with (None: can't tell), for a stream's skip test."""
        return self._start_chars

    def could_start(self, buf: str, pos: int, ascii: bytes | None = None) -> int:
        """The first position >= `pos` where an attempt might begin (len(buf) if none): where the literal
        prefix occurs or is cut off by the end, else where a possible first character is."""
        n = len(buf)
        if ascii is not None and not self._prefix and self._first_bytes is not None:
            at = ascii.translate(self._first_bytes).find(b"F", pos)
            return n if at < 0 else at
        if self._prefix:
            found = buf.find(self._prefix, pos)
            if found >= 0:
                return found
            for s in range(max(pos, n - len(self._prefix) + 1), n):
                if self._prefix.startswith(buf[s:]):
                    return s
            return n
        if self._first is not None:
            m = self._first.search(buf, pos)
            return m.start() if m is not None else n
        return pos

    def advance(self, view: TextView, pos: int, finished: bool) -> tuple[list[Finding], int]:
        """Findings of attempts starting at or after `pos` that are final, and where the next call resumes.

        `view` holds the stream's buffer; offsets are relative to it, and it must hold enough text before
        `pos` for look-behinds. With `finished` every remaining attempt is final. Otherwise matches that
        start where attempts are settled are final, and the resume point is the first position in the
        unsettled tail where an attempt could begin (all normal-mode searches: the `regex` module's partial
        mode is exact but an order of magnitude slower).
        """
        buf, ascii = view.text, view.ascii
        n = len(buf)
        out: list[Finding] = []
        pos = self.could_start(buf, pos, ascii)  # nothing before it can begin a match (the common, cheap exit)
        if pos >= n:
            return out, n
        lo = n if finished else self.settled_from(buf, ascii)
        last_end = pos
        if lo > pos and self._may_match_from(view, pos):
            for m in self.regex.finditer(buf, pos):
                if m.start() >= lo:
                    break
                last_end = m.end()
                f = self.finding(m)
                if f is not None:
                    out.append(f)
        if finished:
            return out, n
        return out, self.could_start(buf, max(lo, last_end), ascii)


def _byte_table(char_pattern: str, mark: bytes) -> bytes | None:
    """A `bytes.translate` table marking with `mark` the ASCII characters that the one-character
    `char_pattern` (compiled case-insensitively, as the rules compile it) matches; None when a character
    cannot be tested alone (a look-around reaching beyond it)."""
    probe = regex.compile(char_pattern, regex.IGNORECASE)
    try:
        marks = [probe.fullmatch(chr(c)) is not None for c in range(128)]
    except regex.error:
        return None
    return bytes(mark[0] if hit else ord(".") for hit in marks) + b"." * 128


def fold(text: str) -> str:
    """Case-fold `text` one character to one character (so offsets survive): `casefold`, first char kept."""
    folded = text.casefold()
    if len(folded) == len(text):
        return folded
    return "".join((c.casefold() or c)[0] for c in text)
