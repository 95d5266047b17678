"""Loading the maintained injection pattern set (guardrails/data/injection.yaml) into compiled patterns.

Besides compiling each pattern, loading works out its *heads*: the literal words every match must start
with (read off the parsed regex). A pattern with heads is only tried, with `match`, where a head starts a
word; the few without (they start with optional punctuation) are searched in windows around their
trigger words instead.
"""

from __future__ import annotations

import re
import re._constants as sre_c
import re._parser as sre_parse
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from guardrails.normalise import skeleton

_SEP = r"[\W_]+"
_GAP = r"(?:(?!(?:my|our)\b)[\w']{1,30}[\W_]+){0,3}"
MIN_HEAD = 2


@dataclass(frozen=True, slots=True)
class InjectionPattern:
    id: str
    type: str
    weight: float
    regex: re.Pattern[str]
    groups: tuple[tuple[str, ...], ...]  # trigger words: a word of every group must occur in the text
    heads: tuple[str, ...]  # every match starts with one of these ( () = unknown: search near triggers)
    leads: tuple[str, ...] = ()  # without heads: every match starts with one of these, found anywhere
    after_non_word: bool = False  # ... or with non-word characters, then one of these


def expand(notation: str) -> str:
    """The regex source for a pattern written in the data file's notation (spaces, `~`, l = i)."""
    body = notation.replace("l", "i").replace(" ?", "\x00").replace(" ", _SEP).replace("~", _GAP)
    return "(?<![a-z0-9])(?:" + body.replace("\x00", r"[\W_]*") + ")"


def _prefixes(seq: Iterable[tuple[Any, Any]], acc: set[str], optional: bool = False) -> tuple[set[str], bool]:
    """Literal prefixes every match of `seq` starts with (given prefixes `acc`), and whether `seq` ended.

    With `optional`, an optional group (`(...)?`) is followed both ways instead of ending the prefixes.
    """
    cur = acc
    seq = list(seq)
    for k, (op, av) in enumerate(seq):
        if op is sre_c.LITERAL:
            cur = {c + chr(av) for c in cur}
        elif op is sre_c.SUBPATTERN:
            cur, done = _prefixes(av[-1], cur, optional)
            if not done:
                return cur, False
        elif op is sre_c.BRANCH:
            out: set[str] = set()
            complete = True
            for branch in av[1]:
                got, done = _prefixes(branch, cur, optional)
                out |= got
                complete = complete and done
            cur = out
            if not complete:
                return cur, False
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            continue
        elif optional and op is sre_c.MAX_REPEAT and av[0] == 0 and av[1] == 1:
            taken, done = _prefixes(av[2], cur, optional)
            if done:
                cur = cur | taken
                continue
            skipped, _ = _prefixes(seq[k + 1:], cur, optional)
            return taken | skipped, False
        else:
            return cur, False
    return cur, True


def _non_word_only(seq: Iterable[tuple[Any, Any]]) -> bool:
    """True when every character `seq` can consume is a non-word character ([\\W_]: not alphanumeric)."""
    for op, av in seq:
        if op is sre_c.LITERAL:
            if chr(av).isalnum():
                return False
        elif op is sre_c.IN:
            for item_op, item_av in av:
                if item_op is sre_c.LITERAL and chr(item_av).isalnum():
                    return False
                if item_op is sre_c.CATEGORY and item_av is not sre_c.CATEGORY_NOT_WORD:
                    return False
                if item_op not in (sre_c.LITERAL, sre_c.CATEGORY):
                    return False
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):
            if not _non_word_only(av[2]):
                return False
        elif op is sre_c.SUBPATTERN:
            if not _non_word_only(av[-1]):
                return False
        elif op is sre_c.BRANCH:
            if not all(_non_word_only(branch) for branch in av[1]):
                return False
        else:
            return False
    return True


def leads_of(source: str) -> tuple[tuple[str, ...], bool]:
    """(literals, after_non_word) such that every match of `source` starts with one of the literals, or, when
    `after_non_word`, with a run of non-word characters and then one of them; ((), False) when unknown.

    Unlike heads, leads may be short and need not start a word: they are looked for anywhere.
    """
    seq = [item for item in sre_parse.parse(source) if item[0] not in (sre_c.ASSERT, sre_c.ASSERT_NOT)]
    after_non_word = False
    while seq and seq[0][0] in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT) and seq[0][1][0] == 0 \
            and _non_word_only([seq[0]]):
        seq, after_non_word = seq[1:], True  # an optional run of punctuation before the first word
    if len(seq) == 1 and seq[0][0] is sre_c.SUBPATTERN:
        seq = list(seq[0][1][-1])
    found, _ = _prefixes(seq, {""}, optional=True)
    if not found or min(len(h) for h in found) < 1:
        return (), False
    # Punctuation is rare enough to look for by its first character alone; a lead that starts with another
    # is redundant (wherever it occurs, the shorter one does).
    found = {h if h[0].isalnum() else h[0] for h in found}
    leads = {h for h in found if not any(o != h and h.startswith(o) for o in found)}
    if after_non_word and not all(h[0].isalnum() for h in leads):
        return (), False
    return tuple(sorted(leads)), after_non_word


def heads_of(source: str) -> tuple[str, ...]:
    """The literal words every match of `source` starts with, or () when some match may start otherwise."""
    found, _ = _prefixes(list(sre_parse.parse(source)), {""})
    if not found or min(len(h) for h in found) < MIN_HEAD:
        return ()
    return tuple(sorted(found))


def load_patterns(path: Path | None = None) -> tuple[str, tuple[InjectionPattern, ...], dict[str, str]]:
    """(version, patterns, category -> finding type) from `path` or the bundled data file.

    Raises ValueError naming the pattern id when a pattern is malformed or does not compile.
    """
    raw = path.read_text() if path else resources.files("guardrails").joinpath("data/injection.yaml").read_text()
    doc: dict[str, Any] = yaml.safe_load(raw)
    categories: dict[str, str] = doc["categories"]
    out = []
    for item in doc["patterns"]:
        pid = item.get("id", "?")
        try:
            type_ = categories[item["category"]]
            source = expand(item["regex"])
            compiled = re.compile(source)
            weight = float(item["weight"])
        except (KeyError, re.error, TypeError, ValueError) as e:
            raise ValueError(f"injection pattern {pid!r}: {e}") from e
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"injection pattern {pid!r}: weight must be in (0, 1]")
        groups = item.get("triggers") or []
        if not groups:
            raise ValueError(f"injection pattern {pid!r}: needs trigger words")
        if not isinstance(groups[0], list):
            groups = [groups]
        folded = tuple(tuple(skeleton(str(t)).text for t in g) for g in groups)
        heads = heads_of(source)
        leads, after_non_word = ((), False) if heads else leads_of(source)
        out.append(InjectionPattern(pid, type_, weight, compiled, folded, heads, leads, after_non_word))
    return str(doc.get("version", "0")), tuple(out), categories
