"""Where a rule's match can start: a few C-speed searches instead of a regex attempt at every position.

`regex.finditer` tries a pattern at every position of a text; for a pattern that starts with look-behinds
that costs tens of nanoseconds a character whether or not anything matches. Each function here returns,
for one rule, a superset of the positions where its matches can start, in increasing order, found with
`str.find`, `bytes` searches over a `TextView` shape, or a reverse search bounded to a few characters; the
rule then tries its pattern with `match` only there (see `PatternRule.candidates`). Each is exact for the
pattern it is written for: the reasoning is next to the rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import regex

from guardrails.rules import TextView

Candidates = Callable[[TextView], Iterator[int]]


def shape(pattern: bytes) -> Candidates:
    """Starts of `pattern`'s matches in the view's loose shape (see `TextView.loose_shape`); the pattern must
    match the shape of every real match's beginning, allowing "n" where a non-ASCII character may stand."""
    probe = re.compile(pattern)

    def starts(view: TextView) -> Iterator[int]:
        for m in probe.finditer(view.loose_shape):
            yield m.start()

    return starts


def run_before(anchor: str, run: str, max_run: int | None = None) -> Candidates:
    """For a pattern whose match starts where a maximal run of `run` characters starts (a look-behind
    forbids a `run` character before the match) and holds an `anchor` character: the start of each such
    run holding an anchor, or none when the run is longer than `max_run` (then no match fits in it).

    `run` is a `regex` character class body (the rule's own engine, so `\\w` means the same).
    """
    before = regex.compile(f"(?r)[^{run}]")
    after = regex.compile(f"[^{run}]")

    def starts(view: TextView) -> Iterator[int]:
        text = view.text
        at = text.find(anchor)
        while at >= 0:
            lo = 0 if max_run is None else max(0, at - max_run - 1)
            stop = before.search(text, lo, at)
            if stop is not None:
                yield stop.end()
            elif lo == 0:
                yield 0
            end = after.search(text, at + 1)  # later anchors in the same run have the same start
            if end is None:
                return
            at = text.find(anchor, end.start())

    return starts
