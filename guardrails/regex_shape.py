"""What a regular expression can do to a stream: how far an attempt reads, which characters a match can
consume, and how a match starts. Read off Python's own regex parser, for patterns written in the syntax
both `re` and `regex` accept; patterns that could hold a stream forever are refused."""

from __future__ import annotations

import re
import re._constants as sre_c
import re._parser as sre_parse
from collections.abc import Iterable

import regex

# The most characters before a match that a pattern's look-behinds or a validator may read; a stream keeps
# at least this much text before the point it resumes from.
LOOKBACK = 60


class BadPattern(ValueError):
    """A rule's pattern does not parse, or cannot be used on a stream."""


class UnboundedPattern(BadPattern):
    """A rule's pattern can match unboundedly long text (`*`, `+`, `{n,}`) or uses a back-reference."""


def _class_piece(op: object, av: object) -> str | None:
    """A regex character-class fragment for one IN item; None when it cannot be expressed positively."""
    if op is sre_c.LITERAL:
        return regex.escape(chr(av))  # type: ignore[arg-type]
    if op is sre_c.RANGE:
        lo, hi = av  # type: ignore[misc]
        return f"{regex.escape(chr(lo))}-{regex.escape(chr(hi))}"
    if op is sre_c.CATEGORY:
        name = str(av)
        if "NOT" in name:
            return None
        for key, piece in (("DIGIT", r"\d"), ("WORD", r"\w"), ("SPACE", r"\s")):
            if key in name:
                return piece
    return None


class _Shape:
    """Width and consumable characters of a parsed pattern, gathered in one walk."""

    def __init__(self) -> None:
        self.positive: set[str] = set()
        self.negated: list[str] = []  # each: a class body whose complement is consumable
        self.anything = False
        self.lookahead = 1  # chars examined past a match's end: `\b` and `$` peek at one
        self.lookbehind = 0  # chars examined before a match's start

    def width(self, sub: Iterable[tuple[object, object]], consuming: bool = True) -> int:
        total = 0
        for op, av in sub:
            if op in (sre_c.LITERAL, sre_c.NOT_LITERAL, sre_c.ANY, sre_c.IN):
                if consuming:
                    self._consumes(op, av)
                total += 1
            elif op is sre_c.BRANCH:
                total += max(self.width(b, consuming) for b in av[1])  # type: ignore[index]
            elif op is sre_c.SUBPATTERN:
                total += self.width(av[-1], consuming)  # type: ignore[index]
            elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None)):
                _lo, hi, p = av  # type: ignore[misc]
                if hi is sre_c.MAXREPEAT or hi >= 1 << 16:
                    raise UnboundedPattern("unbounded repetition: use {m,n} instead of *, + or {m,}")
                total += hi * self.width(p, consuming)
            elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
                w = self.width(av[1], False)  # type: ignore[index]  # examined, not consumed
                if av[0] > 0:  # type: ignore[index]
                    self.lookahead = max(self.lookahead, w)
                else:
                    self.lookbehind = max(self.lookbehind, w)
                total += w
            elif op is getattr(sre_c, "ATOMIC_GROUP", None):
                total += self.width(av, consuming)  # type: ignore[arg-type]
            elif op is sre_c.AT:
                continue
            else:
                raise UnboundedPattern(f"unsupported construct in a guardrail pattern: {op}")
        return total

    def _consumes(self, op: object, av: object) -> None:
        if op is sre_c.ANY:
            self.anything = True
        elif op is sre_c.LITERAL:
            self.positive.add(regex.escape(chr(av)))  # type: ignore[arg-type]
        elif op is sre_c.NOT_LITERAL:
            self.negated.append(regex.escape(chr(av)))  # type: ignore[arg-type]
        else:  # IN
            items = list(av)  # type: ignore[call-overload]
            negate = bool(items) and items[0][0] is sre_c.NEGATE
            pieces = [_class_piece(o, a) for o, a in items[1:] if negate] if negate else \
                     [_class_piece(o, a) for o, a in items]
            if any(p is None for p in pieces):
                self.anything = True
            elif negate:
                self.negated.append("".join(pieces))  # type: ignore[arg-type]
            else:
                self.positive.update(pieces)  # type: ignore[arg-type]

    def stopper(self) -> str | None:
        """A one-character pattern matching exactly the characters no match can consume (None: no such)."""
        if self.anything:
            return None
        body = "".join(sorted(self.positive))
        if not self.negated:
            return f"[^{body}]" if body else r"[\s\S]"
        guards = "".join(f"(?=[{x}])" for x in self.negated[1:])
        return (f"(?![{body}])" if body else "") + guards + f"[{self.negated[0]}]"


def _starts(seq: list[tuple[object, object]]) -> tuple[set[str] | None, bool]:
    """Class pieces for the characters a match of `seq` can start with (None: any), and whether `seq`
    can match the empty string (then what follows it may start the match too)."""
    for k, (op, av) in enumerate(seq):
        if op in (sre_c.ASSERT, sre_c.ASSERT_NOT, sre_c.AT):
            continue
        if op is sre_c.LITERAL or op is sre_c.IN:
            shape = _Shape()
            shape._consumes(op, av)
            if shape.anything or shape.negated:
                return None, False
            return set(shape.positive), False
        if op in (sre_c.SUBPATTERN, getattr(sre_c, "ATOMIC_GROUP", None)):
            inner, empty = _starts(list(av[-1] if op is sre_c.SUBPATTERN else av))  # type: ignore[index,arg-type]
        elif op is sre_c.BRANCH:
            inner, empty = set(), False
            for branch in av[1]:  # type: ignore[index]
                got, e = _starts(list(branch))
                if got is None:
                    return None, False
                inner |= got
                empty = empty or e
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None)):
            lo, _hi, body = av  # type: ignore[misc]
            inner, empty = _starts(list(body))
            empty = empty or lo == 0
        else:
            return None, False
        if inner is None:
            return None, False
        if not empty:
            return inner, False
        rest, rest_empty = _starts(seq[k + 1:])
        return (None if rest is None else inner | rest), rest_empty
    return set(), True


def _literal_prefix(seq: list[tuple[object, object]]) -> str:
    """The literal characters every match starts with (case-sensitive patterns only)."""
    out = []
    for op, av in seq:
        if op in (sre_c.ASSERT, sre_c.ASSERT_NOT) and not out:
            continue
        if op is sre_c.LITERAL:
            out.append(chr(av))  # type: ignore[arg-type]
        elif op is sre_c.SUBPATTERN and not av[1]:  # type: ignore[index]  # a group adding no flags
            inner = _literal_prefix(list(av[-1]))  # type: ignore[index]
            out.append(inner)
            if len(inner) != len(av[-1]):  # type: ignore[index,arg-type]
                break
        else:
            break
    return "".join(out)


def pattern_starts(pattern: str) -> tuple[str, str | None]:
    """(literal prefix of every match, character class any match starts with or None), for a stream to
    tell cheaply where in its unsettled tail an attempt could still begin."""
    parsed = list(sre_parse.parse(pattern))
    pieces, _empty = _starts(parsed)
    first = None if pieces is None or not pieces else "[" + "".join(sorted(pieces)) + "]"
    return _literal_prefix(parsed), first


def pattern_shape(pattern: str) -> tuple[int, int, str | None]:
    """(most chars an attempt examines, most chars it peeks past a match, stopper pattern or None).

    Raises UnboundedPattern for unbounded repetition, back-references, conditionals or a look-behind longer
    than LOOKBACK.
    """
    shape = _Shape()
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as e:
        raise BadPattern(f"not a valid regular expression: {e}") from e
    width = shape.width(parsed)
    if shape.lookbehind > LOOKBACK:
        raise UnboundedPattern(f"look-behinds may read at most {LOOKBACK} characters")
    return width, shape.lookahead, shape.stopper()
