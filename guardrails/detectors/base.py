"""The detector seam: a named, versioned pure function from text to findings."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from guardrails.rules import KeywordRule, PatternRule, Rule, fold
from guardrails.verdict import Finding


@runtime_checkable
class Detector(Protocol):
    """Finds spans or properties of one kind in a text; pure, bounded, never returns the text itself."""

    name: str
    version: str

    def scan(self, text: str) -> list[Finding]: ...


class RuleDetector:
    """A detector made of span rules: usable on whole texts and, through its `rules`, on streams."""

    streamable = True

    def __init__(self, name: str, version: str, rules: tuple[Rule, ...]):
        self.name, self.version, self.rules = name, version, rules
        self._needs_fold = any(isinstance(r, KeywordRule) or (isinstance(r, PatternRule) and r.requires_lower)
                               for r in rules)
        self.width = max((r.width for r in rules), default=0)

    def scan(self, text: str) -> list[Finding]:
        """Every rule's findings over the whole text, in rule order."""
        folded = fold(text) if self._needs_fold else None
        out: list[Finding] = []
        for rule in self.rules:
            out.extend(rule.scan(text, folded))
        return out
