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
from collections.abc import Iterator
from dataclasses import dataclass
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
_SPACED_SHAPE = re.compile(rb" a( {1,3})a\1a\1a")
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


@dataclass(frozen=True, slots=True)
class MappedText:
    """A derived text and, piece by piece, where each piece came from in its source text."""

    text: str
    starts: tuple[int, ...] = ()  # start of each piece in `text`
    sources: tuple[tuple[int, int, bool], ...] = ()  # (source start, source end, copied verbatim)

    def source_span(self, start: int, end: int) -> tuple[int, int]:
        """The span of the source text that `text[start:end]` came from (identity when no pieces)."""
        if not self.starts:
            return start, end
        return self._source_pos(start, False), self._source_pos(max(start, end - 1), True)

    def _source_pos(self, pos: int, end: bool) -> int:
        i = max(bisect_right(self.starts, pos) - 1, 0)
        s, e, verbatim = self.sources[i]
        if verbatim:
            return min(s + (pos - self.starts[i]) + (1 if end else 0), e)
        return e if end else s


def skeleton(text: str) -> MappedText:
    """Fold `text` for pattern matching (see module doc); offsets map back through `source_span`."""
    if text.isascii():
        return MappedText(text.lower().translate(_LEET))
    parts: list[str] = []
    starts: list[int] = []
    sources: list[tuple[int, int, bool]] = []
    pos = 0
    out_len = 0

    def put(piece: str, s: int, e: int, verbatim: bool) -> None:
        nonlocal out_len
        starts.append(out_len)
        sources.append((s, e, verbatim))
        parts.append(piece)
        out_len += len(piece)

    for m in _NON_ASCII_RUN.finditer(text):
        if m.start() > pos:
            put(text[pos:m.start()].lower(), pos, m.start(), True)
        for i in range(m.start(), m.end()):
            folded = fold_char(text[i])
            if folded:
                put(folded, i, i + 1, len(folded) == 1)
        pos = m.end()
    if pos < len(text):
        put(text[pos:].lower(), pos, len(text), True)
    return MappedText("".join(parts).translate(_LEET), tuple(starts), tuple(sources))


def despace(text: str) -> MappedText | None:
    """Join letter-spaced words ("i g n o r e  a i i") in a skeleton; None if there are none."""
    shape = f" {text} ".encode("ascii", "replace").translate(_SHAPE)
    if _SPACED_SHAPE.search(shape) is None or _SPACED.search(text) is None:
        return None
    parts: list[str] = []
    starts: list[int] = []
    sources: list[tuple[int, int, bool]] = []
    pos = out = 0
    for m in _SPACED.finditer(text):
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


_BASE64 = regex.compile(r"[A-Za-z0-9+/_\-]{16,8192}={0,2}")
_HEX = regex.compile(r"(?:[0-9A-Fa-f]{2}[:]?){12,4096}")
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
    letters = sum(1 for c in text if c.isalpha() or c == " ")
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


def encoded_segments(text: str, max_segments: int = 16) -> Iterator[tuple[int, int, str]]:
    """(start, end, decoded text) for base64, hex and percent-encoded tokens of `text` that decode to prose.

    Only whitespace-delimited tokens of 16+ characters are candidates (one `split`, no regex pass).
    """
    if text.isascii() and b"a" * 16 not in text.encode("ascii").translate(_TOKEN_SHAPE):
        return
    count = 0
    pos = 0
    if "<" in text or ">" in text:  # tokens inside markup: <div>BASE64</div> (same length, same offsets)
        text = text.replace("<", " ").replace(">", " ")
    for raw in [w for w in text.split() if len(w) >= 16]:
        start = text.find(raw, pos)
        pos = start + len(raw)
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
