"""Text normalisation against obfuscation, keeping a map back to the original offsets.

`skeleton(text)` folds what attackers use to hide words from pattern matching: compatibility forms
(NFKC/NFKD: fullwidth, math alphanumerics, ligatures), accents, zero-width and bidi controls, Unicode tag
characters (decoded, since they smuggle ASCII), homoglyphs (Cyrillic/Greek look-alikes), case and leetspeak. `despace` joins letter-spaced words ("i g n o r e"); `encoded_segments` finds base64, hex and
percent-encoded tokens that decode to text, to be normalised and scanned again. The skeleton is for
matching only: digits fold to letters and "l" to "i", so patterns are written in that alphabet.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterator
from functools import lru_cache
from urllib.parse import unquote

import regex

# Zero-width, joiners, bidi embeddings/overrides/isolates, invisible operators, BOM, soft hyphen,
# Mongolian vowel separator, combining grapheme joiner, variation selectors, tag characters.
INVISIBLE_CLASS = (r"\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e"
                   r"\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f\U000e0100-\U000e01ef")
INVISIBLE_RUN = regex.compile(f"[{INVISIBLE_CLASS}]{{1,4096}}")
TAG_RUN = regex.compile(r"[\U000e0000-\U000e007f]{1,4096}")

# Look-alikes folded to the ASCII character they imitate (Cyrillic, Greek, IPA, punctuation), by target.
_LOOKALIKES = {
    'a': "\u0430\u0251\u03b1",
    'b': "\u0432\u03b2",
    'e': "\u0435\u0451\u03b5",
    'k': "\u043a\u03ba",
    'm': "\u043c",
    'h': "\u043d\u04bb",
    'o': "\u043e\u03bf\u03c3",
    'p': "\u0440\u03c1",
    'c': "\u0441\u03c2",
    't': "\u0442\u03c4",
    'y': "\u0443\u03b3",
    'x': "\u0445\u03c7",
    's': "\u0455",
    'i': "\u0456\u0457\u0131\u026a\u03b9",
    'j': "\u0458\u0237",
    'd': "\u0501",
    'q': "\u051b",
    'w': "\u051d\u03c9",
    'n': "\u0578\u03b7",
    'u': "\u057d\u03c5\u03bc",
    'g': "\u0581\u0261",
    'r': "\u0280",
    'v': "\u03bd",
    '-': "\u2010\u2011\u2012\u2013\u2014\u2015\u2212",
    "'": "\u2018\u2019\u201a",
    '"': "\u201c\u201d\u201e\u00ab\u00bb",
    '<': "\u2039",
    '>': "\u203a",
    '/': "\u2044\u2215",
}
_HOMOGLYPHS = str.maketrans({c: ascii_ for ascii_, chars in _LOOKALIKES.items() for c in chars})
# Leetspeak and look-alike digits, applied everywhere (patterns never contain digits), and "l" read as "i":
# leet "1" stands for either ("a11", "1gnore"), so the skeleton has no "l" and neither do compiled patterns.
_LEET = str.maketrans({"0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "b", "7": "t", "8": "b",
                       "9": "g", "@": "a", "$": "s", "l": "i"})
# Letter-spacing check without a regex pass, on bytes: letters -> "a", separators -> " ", others -> "#".
_SHAPE = bytes(ord("a") if 97 <= c <= 122 else ord(" ") if chr(c) in " .-_*/|'" else ord("#") for c in range(256))
# Four lone letters in a row, evenly spaced by one to three separators: one of three literal shapes.
_SPACED_SHAPES = (b" a a a a", b" a  a  a  a", b" a   a   a   a")
# ... searched as one `re` pattern: `bytes.find` is slow for these on text that is mostly "a" and " "
_SPACED_PROBE = re.compile(b"|".join(_SPACED_SHAPES))
_NON_ASCII_RUN = regex.compile(r"[^\x00-\x7f]+")
_SPACED = re.compile(r"(?<![a-z])[a-z](?:[ .\-_*/|']{1,6}[a-z](?![a-z])){3,}")
_SEPARATOR_RUN = re.compile(r"[ .\-_*/|']+")


@lru_cache(maxsize=8192)
def fold_char(c: str) -> str:
    """The skeleton of one non-ASCII character: '' for invisible ones, ASCII for tags and look-alikes."""
    cp = ord(c)
    if 0xE0020 <= cp <= 0xE007E:
        return chr(cp - 0xE0000).casefold()
    if INVISIBLE_RUN.match(c) or unicodedata.category(c) in ("Cf", "Cc"):
        return ""
    decomposed = unicodedata.normalize("NFKD", c)
    base = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return base.casefold().translate(_HOMOGLYPHS)


class MappedText:
    """A derived text and, piece by piece, where each piece came from in its source text.

    The pieces may be given, or built on first use by `build` (the skeleton's map is only needed for the
    few spans that match, so it is not built for every text).
    """

    __slots__ = ("_build", "_sources", "_starts", "text")

    def __init__(self, text: str, starts: tuple[int, ...] = (), sources: tuple[tuple[int, int, bool], ...] = (),
                 build: Callable[[], tuple[tuple[int, ...], tuple[tuple[int, int, bool], ...]]] | None = None):
        self.text = text
        self._starts = starts  # start of each piece in `text`
        self._sources = sources  # (source start, source end, copied verbatim)
        self._build = build

    def _pieces(self) -> tuple[tuple[int, ...], tuple[tuple[int, int, bool], ...]]:
        if self._build is not None:
            self._starts, self._sources = self._build()
            self._build = None
        return self._starts, self._sources

    @property
    def starts(self) -> tuple[int, ...]:
        return self._pieces()[0]

    @property
    def sources(self) -> tuple[tuple[int, int, bool], ...]:
        return self._pieces()[1]

    def source_span(self, start: int, end: int) -> tuple[int, int]:
        """The span of the source text that `text[start:end]` came from (identity when no pieces)."""
        starts, _ = self._pieces()
        if not starts:
            return start, end
        return self._source_pos(start, False), self._source_pos(max(start, end - 1), True)

    def _source_pos(self, pos: int, end: bool) -> int:
        starts, sources = self._pieces()
        i = max(bisect_right(starts, pos) - 1, 0)
        s, e, verbatim = sources[i]
        if verbatim:
            return min(s + (pos - starts[i]) + (1 if end else 0), e)
        return e if end else s


# The skeleton of ASCII text, byte for byte: lower case, then leetspeak.
_ASCII_SKELETON = bytes(ord(chr(c).lower().translate(_LEET)) if c < 128 else c for c in range(256))


class _FoldTable(dict[int, str]):
    """Code point -> its skeleton (fold_char, then leetspeak), filled on first use; bounded."""

    def __missing__(self, cp: int) -> str:
        folded = fold_char(chr(cp)).translate(_LEET)
        if len(self) < 65536:
            self[cp] = folded
        return folded


_FOLD = _FoldTable()


def _ascii_skeleton(text: str) -> str:
    return text.encode("ascii").translate(_ASCII_SKELETON).decode("ascii")


def skeleton(text: str) -> MappedText:
    """Fold `text` for pattern matching (see module doc); offsets map back through `source_span`."""
    if text.isascii():
        return MappedText(_ascii_skeleton(text))
    parts: list[str] = []
    runs: list[tuple[int, int]] = []
    pos = 0
    for m in _NON_ASCII_RUN.finditer(text):
        s, e = m.span()
        if s > pos:
            parts.append(_ascii_skeleton(text[pos:s]))
        parts.append(text[s:e].translate(_FOLD))
        runs.append((s, e))
        pos = e
    if pos < len(text):
        parts.append(_ascii_skeleton(text[pos:]))
    return MappedText("".join(parts), build=lambda: _skeleton_map(text, runs))


def _skeleton_map(text: str, runs: list[tuple[int, int]]) -> tuple[tuple[int, ...],
                                                                    tuple[tuple[int, int, bool], ...]]:
    """The pieces of `skeleton(text)`: ASCII stretches copied verbatim, each non-ASCII character that
    folds to something its own piece (verbatim when it folds to one character)."""
    starts: list[int] = []
    sources: list[tuple[int, int, bool]] = []
    pos = out = 0
    for s, e in runs:
        if s > pos:
            starts.append(out)
            sources.append((pos, s, True))
            out += s - pos
        for i in range(s, e):
            n = len(_FOLD[ord(text[i])])
            if n:
                starts.append(out)
                sources.append((i, i + 1, n == 1))
                out += n
        pos = e
    if pos < len(text):
        starts.append(out)
        sources.append((pos, len(text), True))
    return tuple(starts), tuple(sources)


def _spaced_runs(text: str, shape: bytes) -> list[re.Match[str]]:
    """`_SPACED.finditer(text)`, tried only where a match can start: a lone letter followed by a separator
    (" a " in the padded `shape` once other characters read as separators too)."""
    loose = shape.replace(b"#", b" ")
    found: list[re.Match[str]] = []
    done = 0
    at = loose.find(b" a ")
    while at >= 0:
        if (m := _SPACED.match(text, at)) is not None:  # `at` is the letter's offset in text
            found.append(m)
            done = m.end()
        at = loose.find(b" a ", max(at + 2, done))
    return found


def despace(text: str) -> MappedText | None:
    """Join letter-spaced words ("i g n o r e  a i i") in a skeleton; None if there are none."""
    shape = f" {text} ".encode("ascii", "replace").translate(_SHAPE)
    if _SPACED_PROBE.search(shape) is None:
        return None
    found = _spaced_runs(text, shape)
    if not found:
        return None
    parts: list[str] = []
    starts: list[int] = []
    sources: list[tuple[int, int, bool]] = []
    pos = out = 0
    for m in found:
        if m.start() > pos:
            starts.append(out)
            sources.append((pos, m.start(), True))
            parts.append(text[pos:m.start()])
            out += m.start() - pos
        # the narrowest gap separates letters of a word; wider gaps were word breaks
        gaps = _SEPARATOR_RUN.split(m.group())
        seps = _SEPARATOR_RUN.findall(m.group())
        narrow = min(len(g) for g in seps)
        joined = gaps[0] + "".join((" " if len(sep) > narrow else "") + part for sep, part in zip(seps, gaps[1:], strict=True))
        starts.append(out)
        sources.append((m.start(), m.end(), False))
        parts.append(joined)
        out += len(joined)
        pos = m.end()
    if pos < len(text):
        starts.append(out)
        sources.append((pos, len(text), True))
        parts.append(text[pos:])
    return MappedText("".join(parts), tuple(starts), tuple(sources))


# ASCII classes: `re` agrees with `regex` on any text and is cheaper per call (`\s` it does not: `regex` below)
_BASE64 = re.compile(r"[A-Za-z0-9+/_\-]{16,8192}={0,2}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2}[:]?){12,4096}")
_PERCENT = regex.compile(r"(?:%[0-9A-Fa-f]{2}[^%\s]{0,3}){6,4096}")
_TRIM = "\"'`()[]{}<>,;.!?"
# Characters of base64, hex and percent-encoded tokens -> "a", everything else -> " ": a text whose shape
# holds no run of 16 "a" has no candidate token (one C-speed test instead of a split).
_TOKEN_SHAPE = bytes(ord("a") if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/=_%:-") else ord(" ")
                     for c in range(256))


def _printable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(map(str.isalpha, text)) + text.count(" ")
    if not text or letters < 0.7 * len(text) or " " not in text.strip():
        return None  # decodes, but not to words: ids, hashes and binary stay undecoded
    return text


def _decode(token: str) -> str | None:
    if _HEX.fullmatch(token):
        try:
            return _printable(bytes.fromhex(token.replace(":", "")))
        except ValueError:
            return None
    if "%" in token and _PERCENT.fullmatch(token):
        plain = unquote(token)
        return plain if _printable(plain.encode()) is not None else None
    if _BASE64.fullmatch(token) and not (token.isalpha() or token.isdigit()):
        data = token.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            decoded = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None
        return _printable(decoded)
    return None


# Whitespace exactly as `str.split` sees it (the `regex` module's \s leaves out \x1c-\x1f), searched
# forwards and backwards from a position to find the whitespace-delimited token around it.
_SPACE_AFTER = re.compile(r"\s")
_SPACE_BEFORE = regex.compile(r"(?r)[\s\x1c-\x1f]")
_RUN16 = b"a" * 16


_WIDE_SPACE = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_SPACES = bytes(ord(" ") if chr(c).isspace() else ord("x") for c in range(128)) + b"x" * 128


def _candidate_tokens(text: str, shape: bytes) -> list[tuple[int, int]]:
    """(start, end) of the whitespace-delimited tokens, in order, that could decode: a token that does holds
    16 characters of the token alphabet in a row, or a "%"."""
    wide = not text.isascii()  # non-ASCII whitespace is not in `spaces`: check each token for it
    spaces = text.encode("ascii", "replace").translate(_SPACES)
    spans = set()
    for probe, where in ((_RUN16, shape), ("%", text)):
        at = where.find(probe)  # type: ignore[arg-type]
        while at >= 0:
            s, e = spaces.rfind(b" ", 0, at) + 1, spaces.find(b" ", at)
            e = len(text) if e < 0 else e
            if wide and _WIDE_SPACE.search(text, s, e):
                before = _SPACE_BEFORE.search(text, 0, at)
                after = _SPACE_AFTER.search(text, at)
                s, e = before.end() if before else 0, after.start() if after else len(text)
            spans.add((s, e))
            at = where.find(probe, e)  # type: ignore[arg-type]
    return sorted(spans)


def encoded_segments(text: str, max_segments: int = 16) -> Iterator[tuple[int, int, str]]:
    """(start, end, decoded text) for base64, hex and percent-encoded tokens of `text` that decode to prose.

    Only whitespace-delimited tokens of 16+ characters with 16 token characters in a row (or a "%") are
    candidates, found with C-speed searches of the text's token shape; no regex pass over the text.
    """
    shape = text.encode("ascii", "replace").translate(_TOKEN_SHAPE)
    if _RUN16 not in shape and (text.isascii() or "%" not in text):
        return
    count = 0
    if "<" in text or ">" in text:  # tokens inside markup: <div>BASE64</div> (same length, same offsets)
        text = text.replace("<", " ").replace(">", " ")
    for start, end in _candidate_tokens(text, shape):
        if end - start < 16:
            continue
        raw = text[start:end]
        token = raw.strip(_TRIM) if raw[0] in _TRIM or raw[-1] in _TRIM else raw
        if len(token) < 16:
            continue
        plain = _decode(token)
        if plain is not None:
            offset = start + raw.find(token)
            yield offset, offset + len(token), plain
            count += 1
            if count >= max_segments:
                return
