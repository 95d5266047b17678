"""Limits and charset anomalies: length, invisible and control characters, Unicode tag smuggling, mixed
scripts inside one word (homoglyph spoofing), and text outside a tenant's allowed scripts."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import regex

from guardrails.detectors.base import RuleDetector
from guardrails.normalise import INVISIBLE_CLASS
from guardrails.rules import PatternRule, TextView
from guardrails.verdict import Finding

LIMITS = "limits"
INVISIBLE = "invisible"
VERSION = "1.0.0"

_NOT_TAG_INVISIBLE = INVISIBLE_CLASS.replace(r"\U000e0000-\U000e007f", "")


_CONTROL_CLASS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"


def invisible() -> RuleDetector:
    """Span rules (stream-safe) for Unicode tag runs, zero-width/bidi/format runs and control characters."""
    # One cheap `re` probe for all three classes: on ordinary text none of the rules runs.
    probe = re.compile(f"[{INVISIBLE_CLASS}{_CONTROL_CLASS}]")
    return RuleDetector(INVISIBLE, VERSION, (
        PatternRule(INVISIBLE, "TAG_CHARACTERS", pattern=r"[\U000e0000-\U000e007f]{1,256}", score=1.0,
                    requires_nonascii=True, requires_re=probe),
        PatternRule(INVISIBLE, "INVISIBLE_CHARS", pattern=f"[{_NOT_TAG_INVISIBLE}]{{1,256}}", score=0.9,
                    requires_nonascii=True, requires_re=probe),
        PatternRule(INVISIBLE, "CONTROL_CHARS", pattern=f"[{_CONTROL_CLASS}]{{1,256}}", score=0.8,
                    requires_re=probe, requires_shape=(b"c",)),
    ))


_CONFUSABLE_RUN = regex.compile(r"[\u0370-\u03ff\u0400-\u052f]{1,64}")
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def mixed_script_words(text: str) -> list[tuple[int, int]]:
    """Spans of words that mix Latin letters with Greek or Cyrillic ones ("p\u0430ypal" with a Cyrillic a)."""
    out: list[tuple[int, int]] = []
    n = len(text)
    for m in _CONFUSABLE_RUN.finditer(text):
        s, e = m.span()
        if out and s < out[-1][1]:
            continue
        before = s > 0 and text[s - 1] in _ASCII_LETTERS
        after = e < n and text[e] in _ASCII_LETTERS
        if before or after:
            while s > 0 and (text[s - 1].isalnum() or text[s - 1] == "_"):
                s -= 1
            while e < n and (text[e].isalnum() or text[e] == "_"):
                e += 1
            out.append((s, e))
    return out


_LETTER = regex.compile(r"[^\W\d_]")


@lru_cache(maxsize=4096)
def script_of(c: str) -> str:
    """The script of a letter, from its Unicode name (LATIN, CYRILLIC, GREEK, CJK, ARABIC, ...)."""
    if c.isascii():
        return "LATIN"
    try:
        first = unicodedata.name(c).split(" ", 1)[0]
    except ValueError:
        return "UNKNOWN"
    return {"HIRAGANA": "JAPANESE", "KATAKANA": "JAPANESE", "HANGUL": "KOREAN", "FULLWIDTH": "LATIN"}.get(first, first)


class Limits:
    """Length, script and homoglyph checks on a whole input text (input side only)."""

    name = LIMITS
    version = VERSION
    streamable = False

    def __init__(self, *, max_chars: int | None = 200_000, mixed_script: bool = True,
                 allowed_scripts: Sequence[str] | None = None, max_foreign_ratio: float = 0.2):
        self.max_chars = max_chars
        self.mixed_script = mixed_script
        self.allowed = frozenset(s.upper() for s in allowed_scripts) if allowed_scripts else None
        self.max_foreign_ratio = max_foreign_ratio

    def scan(self, text: str, view: TextView | None = None) -> list[Finding]:
        out = []
        if self.max_chars is not None and len(text) > self.max_chars:
            out.append(Finding(start=self.max_chars, end=len(text), detector=LIMITS, type="LENGTH_EXCEEDED",
                               score=1.0))
        if text.isascii():
            return out
        if self.mixed_script:
            for s, e in mixed_script_words(text):
                out.append(Finding(start=s, end=e, detector=LIMITS, type="MIXED_SCRIPT", score=0.7))
        if self.allowed is not None:
            letters = _LETTER.findall(text)
            foreign = sum(1 for c in letters if script_of(c) not in self.allowed)
            if letters and foreign / len(letters) > self.max_foreign_ratio:
                out.append(Finding(start=0, end=len(text), detector=LIMITS, type="SCRIPT_NOT_ALLOWED",
                                   score=round(min(1.0, 0.5 + foreign / len(letters) / 2), 3)))
        return out
