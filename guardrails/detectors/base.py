"""The detector seam: a named, versioned pure function from text to findings."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from guardrails.keywords import AnchoredRule, KeywordRule
from guardrails.rules import PatternRule, TextView
from guardrails.verdict import Finding

Rule = PatternRule | KeywordRule | AnchoredRule


@runtime_checkable
class Detector(Protocol):
    """Finds spans or properties of one kind in a text; pure, bounded, never returns the text itself."""

    name: str
    version: str

    def scan(self, text: str, view: TextView | None = None) -> list[Finding]:
        """Findings in `text`; `view` (a TextView of `text`) shares derived forms between detectors."""
        ...


class RuleDetector:
    """A detector made of span rules: usable on whole texts and, through its `rules`, on streams."""

    streamable = True

    def __init__(self, name: str, version: str, rules: tuple[Rule, ...]):
        self.name, self.version, self.rules = name, version, rules
        self.width = max((r.width for r in rules), default=0)

    def scan(self, text: str, view: TextView | None = None) -> list[Finding]:
        """Every rule's findings over the whole text, in rule order."""
        v = TextView(text) if view is None else view
        out: list[Finding] = []
        for rule in self.rules:
            out.extend(rule.scan(v))
        return out
