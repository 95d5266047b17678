"""Text normalisation against obfuscation, keeping a map back to the original offsets.

`skeleton(text)` folds what attackers use to hide words from pattern matching: compatibility forms
(NFKC/NFKD: fullwidth, math alphanumerics, ligatures), accents, zero-width and bidi controls, Unicode tag
characters (decoded, since they smuggle ASCII), homoglyphs (Cyrillic/Greek look-alikes), case and leetspeak
inside words. `despace` joins letter-spaced words ("i g n o r e"); `encoded_segments` finds base64, hex and
percent-encoded runs that decode to text, to be normalised and scanned again.
"""

from __future__ import annotations

import base64
import binascii
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

_HOMOGLYPHS = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ո": "n", "ս": "u", "ց": "g", "ɡ": "g", "ɑ": "a", "ı": "i", "ȷ": "j", "ʀ": "r", "ɪ": "i",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "γ": "y", "ω": "w", "ς": "c", "σ": "o", "μ": "u",
    # punctuation look-alikes
    "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "―": "-", "−": "-", "‘": "'", "’": "'", "‚": "'",
    "“": '"', "”": '"', "„": '"', "‹": "<", "›": ">", "«": '"', "»": '"', "⁄": "/", "∕": "/",
})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a",
                       "$": "s", "!": "i", "|": "i"})
# A token that mixes letters with leet characters ("1gn0re", "pr3v!ous"); plain numbers stay numbers.
_LEET_TOKEN = regex.compile(r"[a-z0-9@$!|]*(?:[a-z][0-9@$!|]|[0-9@$!|][a-z])[a-z0-9@$!|]*")
_NON_ASCII_RUN = regex.compile(r"[^\x00-\x7f]+")
_SPACED = regex.compile(r"(?<![a-z])[a-z](?:[ .\-_*/|]{1,3}[a-z](?![a-z])){3,}")
_SEPARATOR_RUN = regex.compile(r"[ .\-_*/|]+")


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


def _unleet(m: regex.Match[str]) -> str:
    token = m.group()
    core = token.rstrip("!|$@")  # "instructions!" keeps its punctuation
    return core.translate(_LEET) + token[len(core):]


def _leet(text: str) -> str:
    if not _LEET_TOKEN.search(text):
        return text
    return _LEET_TOKEN.sub(_unleet, text)


def skeleton(text: str) -> MappedText:
    """Fold `text` for pattern matching (see module doc); offsets map back through `source_span`."""
    if text.isascii():
        return MappedText(_leet(text.lower()))
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
    return MappedText(_leet("".join(parts)), tuple(starts), tuple(sources))


def despace(text: str) -> MappedText | None:
    """Join letter-spaced words ("i g n o r e  a l l") in an already folded text; None if there are none."""
    if _SPACED.search(text) is None:
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
        # single separators join letters; longer gaps were word breaks
        joined = _SEPARATOR_RUN.sub(lambda g: " " if len(g.group()) > 1 else "", m.group())
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


_BASE64 = regex.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{16,8192}={0,2}")
_HEX = regex.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){12,4096}(?![0-9A-Fa-f])")
_PERCENT = regex.compile(r"(?:%[0-9A-Fa-f]{2}[^%\s]{0,3}){6,4096}")


def _printable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(1 for c in text if c.isalpha() or c == " ")
    if not text or letters < 0.7 * len(text) or " " not in text.strip():
        return None  # decodes, but not to words: ids, hashes and binary stay undecoded
    return text


def encoded_segments(text: str, max_segments: int = 16) -> Iterator[tuple[int, int, str]]:
    """(start, end, decoded text) for base64, hex and percent-encoded runs of `text` that decode to prose."""
    count = 0
    for m in _BASE64.finditer(text):
        raw = m.group()
        if raw.isalpha() or raw.isdigit():
            continue
        data = raw.replace("-", "+").replace("_", "/")
        try:
            decoded = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        plain = _printable(decoded)
        if plain is not None:
            yield m.start(), m.end(), plain
            count += 1
            if count >= max_segments:
                return
    for m in _HEX.finditer(text):
        try:
            decoded = bytes.fromhex(m.group().replace(" ", "").replace(":", ""))
        except ValueError:
            continue
        plain = _printable(decoded)
        if plain is not None:
            yield m.start(), m.end(), plain
            count += 1
            if count >= max_segments:
                return
    if "%" in text:
        for m in _PERCENT.finditer(text):
            plain = unquote(m.group())
            if plain != m.group() and _printable(plain.encode()) is not None:
                yield m.start(), m.end(), plain
                count += 1
                if count >= max_segments:
                    return
