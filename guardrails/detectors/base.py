"""The detector seam: a named, versioned pure function from text to findings."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from guardrails.keywords import AnchoredRule, AnchorProbe, KeywordRule
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
        # Anchored rules sharing anchors and group are scanned together (see AnchorProbe).
        shared: dict[tuple[int, str], list[AnchoredRule]] = {}
        for r in rules:
            if isinstance(r, AnchoredRule):
                shared.setdefault((id(r.anchors), r.group), []).append(r)
        self._probes = {r: probe for group in shared.values() if len(group) > 1
                        for probe in (AnchorProbe(group),) for r in group}

    def scan(self, text: str, view: TextView | None = None) -> list[Finding]:
        """Every rule's findings over the whole text, in rule order."""
        v = TextView(text) if view is None else view
        out: list[Finding] = []
        probed: dict[AnchorProbe, dict[Rule, list[Finding]]] = {}
        for rule in self.rules:
            probe = self._probes.get(rule)
            if probe is None:
                out.extend(rule.scan(v))
                continue
            if probe not in probed:
                probed[probe] = dict(zip(probe.rules, probe.scan(v), strict=True))
            out.extend(probed[probe][rule])
        return out
