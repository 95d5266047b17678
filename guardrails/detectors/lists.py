"""Per-tenant blocklists (words, phrases, regexes) and allowlists that exempt known-good values."""

from __future__ import annotations

from collections.abc import Sequence

import regex

from guardrails.detectors.base import RuleDetector
from guardrails.keywords import KeywordRule
from guardrails.rules import PatternRule, fold

BLOCKLIST = "blocklist"
VERSION = "1.0.0"


def blocklist(terms: Sequence[str], regexes: Sequence[str] = (), type_: str = "BLOCKLIST") -> RuleDetector:
    """A detector for whole-word, case-insensitive `terms` and for `regexes` (each bounded in length).

    Raises ValueError (UnboundedPattern) or regex.error for a regex that cannot be used on a stream.
    """
    rules: list[PatternRule | KeywordRule] = []
    if any(t.strip() for t in terms):
        rules.append(KeywordRule(BLOCKLIST, type_, terms))
    for pattern in regexes:
        rules.append(PatternRule(BLOCKLIST, type_, pattern=pattern, score=1.0))
    return RuleDetector(BLOCKLIST, VERSION, tuple(rules))


class Allowlist:
    """Values a tenant declares safe: a finding whose exact text is listed (case-insensitive) or fully
    matches one of the regexes is dropped, whatever the detector."""

    def __init__(self, values: Sequence[str] = (), regexes: Sequence[str] = ()):
        self._values = frozenset(fold(v.strip()) for v in values if v.strip())
        self._regexes = tuple(regex.compile(r) for r in regexes)

    def __bool__(self) -> bool:
        return bool(self._values or self._regexes)

    def allows(self, value: str) -> bool:
        """True when `value` (the text of a finding's span) is exempt."""
        if fold(value) in self._values:
            return True
        return any(r.fullmatch(value) for r in self._regexes)
