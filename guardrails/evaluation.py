"""Precision and recall of a policy's detectors on a labelled JSONL set (see tests/data/guardrails).

Each line: {"text", "spans": [{"type", "start", "end"}], "attack": type or null, "kind", "obfuscation"}.
Span detectors (PII, secrets) are scored per span: a gold span is found when a finding of the same
detector overlaps it (of the same type, for the per-type recall), a finding is a false positive when it
overlaps no gold span of its detector (per-type precision counts these false alarms by finding type). Injection is
scored per text: an attack is caught when any injection finding fires; every finding on a text without
an attack is a false positive.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardrails.chain import Chain
from guardrails.detectors import REGISTRY
from schemas.errors import ConfigError

SPAN_DETECTORS = ("pii", "secrets")


def detector_of(type_: str) -> str | None:
    """The span detector that reports finding type `type_` (None for types no span detector reports)."""
    for name in SPAN_DETECTORS:
        types = REGISTRY[name].types
        if types is not None and type_ in types:
            return name
    return None


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"precision": round(self.precision, 4), "recall": round(self.recall, 4), "tp": self.tp,
                "fp": self.fp, "fn": self.fn}


@dataclass
class EvalReport:
    """Counts per detector, per finding type, and for injection per attack type and obfuscation."""

    examples: int = 0
    detectors: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    types: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    attacks: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    obfuscations: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    benign_texts: int = 0
    benign_flagged: int = 0
    misses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def injection_fpr(self) -> float:
        """Share of texts without an attack on which the injection detector fired."""
        return self.benign_flagged / self.benign_texts if self.benign_texts else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "detectors": {k: v.as_dict() for k, v in sorted(self.detectors.items())},
            "types": {k: v.as_dict() for k, v in sorted(self.types.items())},
            "injection": {"false_positive_rate": round(self.injection_fpr, 4), "benign_texts": self.benign_texts,
                          "benign_flagged": self.benign_flagged,
                          "by_attack": {k: round(v.recall, 4) for k, v in sorted(self.attacks.items())},
                          "by_obfuscation": {k: round(v.recall, 4) for k, v in sorted(self.obfuscations.items())}},
        }

    def markdown(self) -> str:
        """A table: one row per detector, then per type."""
        lines = ["| detector / type | precision | recall | tp | fp | fn |", "|---|---|---|---|---|---|"]
        for name, c in sorted(self.detectors.items()):
            lines.append(f"| **{name}** | {c.precision:.3f} | {c.recall:.3f} | {c.tp} | {c.fp} | {c.fn} |")
        for name, c in sorted(self.types.items()):
            lines.append(f"| {name} | {c.precision:.3f} | {c.recall:.3f} | {c.tp} | {c.fp} | {c.fn} |")
        lines.append(f"\ninjection false-positive rate on texts without an attack: {self.injection_fpr:.2%} "
                     f"({self.benign_flagged}/{self.benign_texts})")
        return "\n".join(lines)


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """Rows of a labelled set; raises ConfigError naming the line of a malformed one."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConfigError(f"{path}:{n}: each line must be an object with a 'text' string")
            yield row


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def evaluate(chain: Chain, rows: Iterable[dict[str, Any]], *, keep_misses: int = 0) -> EvalReport:
    """Score `chain` (a policy side) on labelled `rows`; keeps up to `keep_misses` errors for inspection."""
    report = EvalReport()
    for row in rows:
        report.examples += 1
        text = row["text"]
        findings = chain.findings(text)
        gold = [(s["type"], (s["start"], s["end"])) for s in row.get("spans") or ()]
        errors = []
        for type_, span in gold:
            det = detector_of(type_)
            if det is None:
                continue
            hit_det = any(f.detector == det and _overlaps((f.start, f.end), span) for f in findings)
            hit_type = any(f.type == type_ and _overlaps((f.start, f.end), span) for f in findings)
            report.detectors[det].tp += hit_det
            report.detectors[det].fn += not hit_det
            report.types[type_].tp += hit_type
            report.types[type_].fn += not hit_type
            if not hit_det:
                errors.append(f"missed {type_} {text[span[0]:span[1]]!r}")
        for f in findings:
            if f.detector not in SPAN_DETECTORS:
                continue
            ok = any(detector_of(t) == f.detector and _overlaps((f.start, f.end), sp) for t, sp in gold)
            if not ok:  # a false alarm; a second label on a true span (STRIPE_KEY and SECRET) is not
                report.detectors[f.detector].fp += 1
                report.types[f.type].fp += 1
                errors.append(f"false {f.type} {text[f.start:f.end]!r}")
        fired = any(f.detector == "injection" for f in findings)
        attack = row.get("attack")
        inj = report.detectors["injection"]
        if attack:
            inj.tp += fired
            inj.fn += not fired
            report.attacks[attack].tp += fired
            report.attacks[attack].fn += not fired
            how = row.get("obfuscation") or "plain"
            report.obfuscations[how].tp += fired
            report.obfuscations[how].fn += not fired
            if not fired:
                errors.append(f"missed {attack}")
        else:
            report.benign_texts += 1
            report.benign_flagged += fired
            inj.fp += fired
            if fired:
                errors.append("false injection")
        if errors and len(report.misses) < keep_misses:
            report.misses.append({"id": row.get("id"), "text": text[:300], "errors": errors})
    return report
