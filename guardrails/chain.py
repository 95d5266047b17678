"""The chain: run a side's detectors, keep the findings its policy cares about, decide, redact.

Pure functions over plain data: `Step.judge` turns a raw finding into an actioned one (or drops it),
`redact` replaces the spans of redacted and blocked findings with typed placeholders, `Chain.check` does
both for every input part and returns the Verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from guardrails.detectors.base import Detector
from guardrails.detectors.lists import Allowlist
from guardrails.rules import TextView
from guardrails.verdict import Action, Finding, Verdict, strongest

# Types whose redaction removes the text outright: there is nothing a reader should see in its place.
SILENT_TYPES = frozenset({"INVISIBLE_CHARS", "TAG_CHARACTERS", "CONTROL_CHARS", "LENGTH_EXCEEDED"})


def placeholder(type_: str) -> str:
    """What replaces a redacted span of `type_`: `[EMAIL]`, or nothing for invisible characters."""
    return "" if type_ in SILENT_TYPES else f"[{type_}]"


@dataclass(frozen=True, eq=False)
class Step:
    """One detector as a side of a policy configures it."""

    detector: Detector
    action: Action = "redact"
    threshold: float = 0.5
    types: frozenset[str] | None = None
    type_actions: Mapping[str, Action] = field(default_factory=dict)

    def judge(self, f: Finding, text: str, allowlist: Allowlist | None, part: int = 0) -> Finding | None:
        """`f` with its action and part set, or None when below threshold, filtered out or allowlisted."""
        if f.score < self.threshold or (self.types is not None and f.type not in self.types):
            return None
        if allowlist and allowlist.allows(text[f.start:f.end]):
            return None
        return msgspec.structs.replace(f, action=self.type_actions.get(f.type, self.action), part=part)


def span_key(f: Finding) -> tuple[int, int, str, str, float]:
    """Order of findings in a verdict and in redaction: by start, longest first, then name and score."""
    return (f.start, -f.end, f.detector, f.type, -f.score)


def dedupe(findings: Sequence[Finding], *, ordered: bool = False) -> tuple[Finding, ...]:
    """`findings` sorted by `span_key`, keeping one per (part, span, type): two rules that agree count once.

    `ordered`: `findings` are already sorted by `span_key`.
    """
    seen: set[tuple[int, int, int, str]] = set()
    out = []
    for f in (findings if ordered else sorted(findings, key=span_key)):
        key = (f.part, f.start, f.end, f.type)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return tuple(out)


def redact(text: str, findings: Iterable[Finding], offset: int = 0, *, ordered: bool = False) -> str:
    """`text` with each group of overlapping redacted/blocked spans replaced by the first one's placeholder.

    `offset` is where `text` starts in the coordinates of the findings' spans (the stream guard redacts
    pieces of a longer text); every span must lie inside the piece. `ordered`: `findings` are already
    sorted by `span_key`.
    """
    kept = [f for f in findings if f.action != "allow"]
    spans = kept if ordered else sorted(kept, key=span_key)
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    group_end = -1
    for f in spans:
        s, e = f.start - offset, f.end - offset
        if s < group_end:  # overlaps the open group: widen it, keep its placeholder
            if e > group_end:
                group_end = e
            continue
        if group_end >= 0:
            pos = group_end
        out.append(text[pos:s])
        out.append(placeholder(f.type))
        group_end = e
    out.append(text[group_end:])
    return "".join(out)


@dataclass(frozen=True, eq=False)
class Chain:
    """The steps of one side (input or output) of a policy, with the tenant's allowlist."""

    steps: tuple[Step, ...] = ()
    allowlist: Allowlist | None = None

    def findings(self, text: str, part: int = 0, extra: Sequence[Step] = ()) -> list[Finding]:
        """Actioned findings of every step (and `extra` steps) on `text`, sorted by span."""
        out: list[Finding] = []
        view = TextView(text)
        for step in (*self.steps, *extra):
            for raw in step.detector.scan(text, view):
                f = step.judge(raw, text, self.allowlist, part)
                if f is not None:
                    out.append(f)
        out.sort(key=span_key)
        return out

    def check(self, texts: Sequence[str], extra: Sequence[Step] = ()) -> Verdict:
        """The verdict over all parts of `texts`; redacted parts in `texts`, findings tagged with their part."""
        findings: list[Finding] = []
        redacted: list[str] = []
        for i, text in enumerate(texts):
            found = self.findings(text, i, extra)  # sorted by span_key
            findings.extend(found)
            redacted.append(redact(text, found, ordered=True) if found else text)
        return Verdict(action=strongest(f.action for f in findings), findings=dedupe(findings, ordered=len(texts) == 1),
                       texts=tuple(redacted))

    @property
    def detector_versions(self) -> dict[str, str]:
        return {s.detector.name: s.detector.version for s in self.steps}
