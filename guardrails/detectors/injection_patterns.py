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


def expand(notation: str) -> str:
    """The regex source for a pattern written in the data file's notation (spaces, `~`, l = i)."""
    body = notation.replace("l", "i").replace(" ?", "\x00").replace(" ", _SEP).replace("~", _GAP)
    return "(?<![a-z0-9])(?:" + body.replace("\x00", r"[\W_]*") + ")"


def _prefixes(seq: Iterable[tuple[Any, Any]], acc: set[str]) -> tuple[set[str], bool]:
    """Literal prefixes every match of `seq` starts with (given prefixes `acc`), and whether `seq` ended."""
    cur = acc
    for op, av in seq:
        if op is sre_c.LITERAL:
            cur = {c + chr(av) for c in cur}
        elif op is sre_c.SUBPATTERN:
            cur, done = _prefixes(av[-1], cur)
            if not done:
                return cur, False
        elif op is sre_c.BRANCH:
            out: set[str] = set()
            complete = True
            for branch in av[1]:
                got, done = _prefixes(branch, cur)
                out |= got
                complete = complete and done
            cur = out
            if not complete:
                return cur, False
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            continue
        else:
            return cur, False
    return cur, True


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
        out.append(InjectionPattern(pid, type_, weight, compiled, folded, heads_of(source)))
    return str(doc.get("version", "0")), tuple(out), categories
