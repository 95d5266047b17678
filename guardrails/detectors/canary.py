"""System-prompt leakage: the output contains the canary string planted in the system prompt."""

from __future__ import annotations

from functools import lru_cache

import regex

from guardrails.detectors.base import RuleDetector
from guardrails.rules import PatternRule

CANARY = "canary"
VERSION = "1.0.0"
MAX_CANARY_CHARS = 256


@lru_cache(maxsize=1024)
def canary_detector(canary: str) -> RuleDetector:
    """A span detector for `canary` (case-insensitive, whitespace inside it may vary in width).

    Raises ValueError for an empty canary or one over MAX_CANARY_CHARS characters.
    """
    words = canary.split()
    if not words or len(canary) > MAX_CANARY_CHARS:
        raise ValueError(f"a system-prompt canary must be 1 to {MAX_CANARY_CHARS} non-blank characters")
    pattern = r"[ \t\r\n]{1,8}".join(regex.escape(w) for w in words)
    # Every character that matches an ASCII one case-insensitively folds to it: an ASCII first word, folded,
    # is in the folded text wherever the canary occurs (a whole-text check and a stream skip on it).
    requires = (words[0].lower(),) if words[0].isascii() else ()
    return RuleDetector(CANARY, VERSION, (PatternRule(CANARY, "SYSTEM_PROMPT_LEAK", pattern=f"(?i:{pattern})",
                                                      score=1.0, requires_lower=requires),))
