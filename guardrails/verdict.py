"""What a guardrail check returns: findings (never the sensitive text), the action taken, the redacted text.

`Finding` and `Verdict` are plain frozen msgspec Structs so the gateway can log, encode and compare them
cheaply; `GuardrailVerdict` is the flat summary the telemetry layer ships as an event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Literal

import msgspec

from schemas.errors import ErrorKind, ServoloopError

Action = Literal["allow", "redact", "block"]
Side = Literal["input", "output"]
ACTIONS: tuple[Action, ...] = ("allow", "redact", "block")
SEVERITY: dict[str, int] = {"allow": 0, "redact": 1, "block": 2}


class Finding(msgspec.Struct, frozen=True, kw_only=True, order=True):
    """One detection: which detector, what type, where (offsets into input part `part`), how sure, what was done.

    Holds no text: spans point into the caller's own input, so a verdict can be logged or shipped safely.
    """

    start: int
    end: int
    detector: str
    type: str
    score: float
    action: Action = "allow"
    part: int = 0


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one check: the strongest action over all findings and the text after redaction.

    `texts` holds one redacted text per input part (one for `check_output`); on `allow` they equal the
    inputs. On `block` they are fully redacted too, but the caller must not forward them.
    """

    action: Action
    findings: tuple[Finding, ...] = ()
    texts: tuple[str, ...] = ("",)

    @property
    def text(self) -> str:
        """The redacted text of a single-part check (parts joined by newlines otherwise)."""
        return self.texts[0] if len(self.texts) == 1 else "\n".join(self.texts)

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def types(self) -> tuple[str, ...]:
        """Distinct finding types, sorted (safe to show a client: no text, no offsets)."""
        return tuple(sorted({f.type for f in self.findings}))


class GuardrailVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """Flat telemetry summary of one check: counts per finding type, the action, side and cost; no text."""

    side: Side
    action: Action
    finding_counts: dict[str, int]
    detectors: dict[str, str]
    elapsed_us: int
    policy: str = "default"
    streamed: bool = False


def strongest(actions: Iterable[str]) -> Action:
    """The most severe action among `actions` (`allow` when empty)."""
    best: Action = "allow"
    for a in actions:
        if SEVERITY[a] > SEVERITY[best]:
            best = a  # type: ignore[assignment]
    return best


def summarise(verdict: Verdict, *, side: Side, elapsed_us: int, detectors: dict[str, str],
              policy: str = "default", streamed: bool = False) -> GuardrailVerdict:
    """Build the telemetry summary of `verdict`; `detectors` maps detector name to version."""
    counts = Counter(f.type for f in verdict.findings)
    return GuardrailVerdict(side=side, action=verdict.action, finding_counts=dict(sorted(counts.items())),
                            detectors=dict(detectors), elapsed_us=int(elapsed_us), policy=policy,
                            streamed=streamed)


class GuardrailBlocked(ServoloopError):
    """A guardrail blocked the request or the response; `details` names the finding types, never the text."""

    kind = ErrorKind.INVALID_ARGUMENT
    code = "guardrail_blocked"

    def __init__(self, verdict: Verdict, *, side: Side = "input"):
        blocking = sorted({f.type for f in verdict.findings if f.action == "block"}) or list(verdict.types)
        where = "request" if side == "input" else "response"
        super().__init__(f"the {where} was blocked by a guardrail ({', '.join(blocking)})",
                         details={"side": side, "types": blocking})
        self.verdict = verdict
        self.side = side
        self.summary: GuardrailVerdict | None = None
