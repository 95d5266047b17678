"""Streaming output filtering: emit only text that can no longer become part of a match.

The guard appends each engine chunk to a small buffer and lets every span rule of the output chain advance
over it (`advance` of each rule, see guardrails/rules.py): each rule reports the findings that are final and
the earliest position where a match might still start. Text before the smallest such position, cut back so
no redacted span is split, is redacted and emitted; the rest is held. Rules run once per `batch_chars` new
characters, not per token, and most of them not even then: a rule with nothing pending is skipped when no
character it can start with arrived, a rule on shared anchors when none lies past its resume point, and a
rule that needs a literal and cannot span whitespace moves past the last whitespace while the literal is
absent (one shared search). The hold-back is bounded by the widest rule (a few hundred characters; a PEM
private-key block, once its header has appeared, up to ~5k) plus the batch.

Guarantee (tested with hypothesis): for any text and any chunking, the concatenated output equals the
non-streamed `Policy.check_output(text).text`, and a blocked stream emits a prefix of it that contains no
blocked span.
"""

from __future__ import annotations

from collections.abc import Sequence

from guardrails.chain import Chain, Step, dedupe, redact
from guardrails.detectors.base import RuleDetector
from guardrails.rules import LOOKBACK, PatternRule, TextView, fold
from guardrails.verdict import Finding, Verdict, strongest

CONTEXT = LOOKBACK + 4  # characters kept before the resume point, for look-behinds and validators
BATCH_CHARS = 64  # new characters gathered before the rules run again (`finish` runs them at once)


class StreamGuard:
    """Consumes engine chunks, returns what is safe to emit; `blocked` turns true on a blocking finding.

    Once blocked, `feed` and `finish` return "" and the caller ends the stream with a clear final status.
    Raises TypeError when built over a chain whose detectors cannot run on a stream.
    """

    def __init__(self, chain: Chain, extra: Sequence[Step] = (), *, batch_chars: int = BATCH_CHARS):
        self._allowlist = chain.allowlist
        self._batch = max(1, batch_chars)
        self._unchecked = 0  # characters received since the rules last ran
        self._rules = []
        for step in (*chain.steps, *extra):
            if not isinstance(step.detector, RuleDetector):
                raise TypeError(f"detector {step.detector.name!r} cannot run on a stream")
            self._rules.extend((rule, step) for rule in step.detector.rules)
        self._resume = [0] * len(self._rules)
        # For each rule, the ASCII characters its attempts (or anchors) can start with: a rule with nothing
        # pending is skipped when none of them arrived since the rules last ran.
        self._starts = [rule.start_chars() for rule, _ in self._rules]
        # Anchored rules: one test per shared anchors (their last event) skips every rule resuming after it.
        self._anchors = [getattr(rule, "anchors", None) for rule, _ in self._rules]
        # Rules that need a literal in every match and cannot match across whitespace: while no literal has
        # arrived since their resume point, no attempt before the last whitespace can ever match, so they
        # resume after it without running (one shared search instead of one rule each).
        self._literals = [_whitespace_bounded_literals(rule) for rule, _ in self._rules]
        self._plan = [(rule, step, starts, literals, anchors) for (rule, step), starts, literals, anchors
                      in zip(self._rules, self._starts, self._literals, self._anchors, strict=True)]
        self._checked_to = 0  # absolute offset up to which the rules have run
        self._buf = ""
        self._folded = ""  # fold of the start of self._buf, extended when the rules run (folding is per character)
        self._base = 0  # absolute offset of self._buf[0]
        self._emitted = 0  # absolute offset up to which output has been emitted
        self._pending: list[Finding] = []  # final, not yet emitted
        self._findings: list[Finding] = []
        self._out: list[str] = []
        self.blocked = False
        self.finished = False
        self.chars_in = 0

    @property
    def held(self) -> int:
        """How many received characters are held back right now."""
        return self._base + len(self._buf) - self._emitted

    def feed(self, chunk: str) -> str:
        """Take one chunk; return the text now safe to emit (redacted), possibly ''.

        The rules run once `batch_chars` new characters have arrived (or a newline does): holding a few
        more characters costs the client little and saves re-running every rule per token.
        """
        if self.blocked or self.finished or not chunk:
            return ""
        self._buf += chunk
        self.chars_in += len(chunk)
        self._unchecked += len(chunk)
        if self._unchecked < self._batch:
            return ""
        return self._advance(False)

    def finish(self) -> str:
        """End of the engine stream: return the held-back tail, redacted ('' when blocked)."""
        if self.blocked or self.finished:
            return ""
        out = self._advance(True)
        self.finished = True
        return out

    @property
    def verdict(self) -> Verdict:
        """The verdict so far (final after `finish` or a block); `text` is what was emitted."""
        findings = dedupe(self._findings)
        return Verdict(action=strongest(f.action for f in findings), findings=findings,
                       texts=("".join(self._out),))

    def _advance(self, finished: bool) -> str:
        buf, base = self._buf, self._base
        self._unchecked = 0
        end = base + len(buf)
        fresh = buf[self._checked_to - base:]
        arrived = set(fresh) if fresh.isascii() else None
        checked_to, self._checked_to = self._checked_to, end
        self._folded += fold(buf[len(self._folded):])
        view = TextView(buf, self._folded, max(0, min(self._resume, default=base) - base - 1))
        frontier = end
        last_event: dict[object, int] = {}
        after_space = -1  # just after the buffer's last whitespace (computed when first needed)
        resumes, folded = self._resume, self._folded
        for i, (rule, step, starts, literals, anchors) in enumerate(self._plan):
            pos = resumes[i] - base
            if arrived is not None and starts is not None and pos >= checked_to - base and starts.isdisjoint(arrived):
                resumes[i] = end  # nothing pending, and nothing that could start an attempt arrived
                continue
            if finished:
                pass
            elif literals is not None:
                where = folded if literals[0] == "folded" else buf
                if all(where.find(lit, pos) < 0 for lit in literals[1]):
                    if after_space < 0:
                        after_space = 1 + max(buf.rfind(" "), buf.rfind("\n"), buf.rfind("\t"), buf.rfind("\r"))
                    resume = max(pos, after_space) + base
                    resumes[i] = resume
                    if resume < frontier:
                        frontier = resume
                    continue
            elif anchors is not None:
                last = last_event.get(anchors)
                if last is None:
                    last = last_event[anchors] = anchors.last_event(view)
                if pos > last:  # no anchor at or after `pos`, none pending: `advance` would find nothing
                    resumes[i] = end
                    continue
            found, resume = rule.advance(view, pos, finished)
            resumes[i] = resume + base
            if resume + base < frontier:
                frontier = resume + base
            for raw in found:
                f = step.judge(raw, buf, self._allowlist)
                if f is not None:
                    f = _shift(f, base)
                    self._pending.append(f)
                    self._findings.append(f)
        if any(f.action == "block" for f in self._pending):
            self.blocked = True
            self._buf = self._folded = ""
            return ""
        cut = frontier
        moved = True
        while moved:  # never cut through a span that will be redacted
            moved = False
            for f in self._pending:
                if f.action != "allow" and f.start < cut < f.end:
                    cut, moved = f.start, True
        if cut <= self._emitted:
            return ""
        ready = [f for f in self._pending if f.end <= cut]
        self._pending = [f for f in self._pending if f.end > cut]
        text = redact(buf[self._emitted - base:cut - base], ready, offset=self._emitted)
        self._emitted = cut
        keep = max(min(cut, *self._resume) - CONTEXT, base) if self._resume else cut
        if keep > base:
            self._buf = buf[keep - base:]
            self._folded = self._folded[keep - base:]
            self._base = keep
        if text:
            self._out.append(text)
        return text


def _whitespace_bounded_literals(rule: object) -> tuple[str, tuple[str, ...]] | None:
    """("text" or "folded", literals) when every match of `rule` holds one of the literals (in the text, or
    in the folded text) and no match can hold a space, tab, newline or carriage return; else None."""
    if not isinstance(rule, PatternRule) or rule._stop is None:
        return None
    if rule.requires_digit or rule.requires_nonascii:  # (a `requires_re` leaves the literals necessary)
        return None
    if not all(rule._stop.fullmatch(c) for c in " \n\t\r"):
        return None
    if rule.requires and not rule.requires_lower:
        return "text", rule.requires
    if rule.requires_lower and not rule.requires:
        return "folded", rule.requires_lower
    return None


def _shift(f: Finding, by: int) -> Finding:
    if by == 0:
        return f
    return Finding(start=f.start + by, end=f.end + by, detector=f.detector, type=f.type, score=f.score,
                   action=f.action, part=f.part)
