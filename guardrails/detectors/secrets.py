"""Secrets: vendor API keys and tokens, private key blocks, JWTs, credentials in URLs, and high-entropy
values next to words like key/token/secret/password.

Vendor formats are exact (fixed prefixes and lengths); the keyword rule accepts a value only when it looks
generated (length, character classes, Shannon entropy) and not like a placeholder or a code identifier.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections import Counter

import regex

from guardrails.detectors.anchors import context_anchors
from guardrails.keywords import AnchoredRule
from guardrails.rules import PatternRule

NAME = "secrets"
VERSION = "1.0.0"


def shannon_entropy(text: str) -> float:
    """Bits per character of `text`'s character distribution (0 for empty text)."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def char_classes(text: str) -> int:
    """How many of lower-case, upper-case and digits occur in `text`."""
    if text.isascii():  # case changes only letters of that case; digits survive deleting everything else
        return (text.upper() != text) + (text.lower() != text) + bool(text.translate(_KEEP_DIGITS))
    return (any(c.islower() for c in text)) + (any(c.isupper() for c in text)) + (any(c.isdigit() for c in text))


_KEEP_DIGITS = {c: None for c in range(128) if not chr(c).isdigit()}


_PLACEHOLDER = regex.compile(
    r"(?i)^(?:x+|\*+|\.+|-+|_+|0+|1234.*|your[_\-].*|my[_\-].*|.*\b(?:example|placeholder|redacted|changeme|"
    r"dummy|sample|secret_here|here|xxxx|todo|fixme|env|environ|config|settings|getenv|process|os)\b.*)$")
_DOTTED_IDENTIFIER = regex.compile(r"^[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)+$|^[a-z]+(?:_[a-z]+)+$|^[A-Z]+(?:_[A-Z]+)+$")
_PASSWORD_WORDS = ("pass", "pwd", "passphrase")


def generated_looking(value: str, *, password: bool = False) -> bool:
    """True when `value` looks like a generated secret rather than a word, identifier or placeholder."""
    # One conjunction, cheapest tests first: most values next to "token" or "secret" are plain words.
    n = len(value)
    if n < (6 if password else 10) or (password and value.isalpha()):
        return False
    classes = char_classes(value)
    if password:
        if classes + (not value.isalnum()) < 2:
            return False
    elif classes < 2 or (classes == 2 and n < 16):
        return False
    else:
        entropy = shannon_entropy(value)
        if not ((n >= 16 and entropy >= 3.3) or (classes == 3 and entropy >= 3.0)):
            return False
    return not (len(set(value)) < 4 or _PLACEHOLDER.match(value) or _DOTTED_IDENTIFIER.match(value))


def _keyword_secret(m: regex.Match[str]) -> tuple[str, float] | None:
    keyword = m.group("k").lower()
    value = m.group("v").rstrip(".,;:!?'\"`)]}")
    password = any(w in keyword for w in _PASSWORD_WORDS)
    if not generated_looking(value, password=password):
        return None
    return ("PASSWORD" if password else "SECRET"), 0.85, m.start("v"), m.start("v") + len(value)


def _vendor(m: regex.Match[str]) -> tuple[str, float] | None:
    type_ = m.lastgroup or "API_KEY"
    if type_ == "OPENAI_API_KEY":
        body = m.group().rsplit("-", 1)[-1]
        if char_classes(body) < 3 or shannon_entropy(body) < 3.5:
            return None
    return type_, 0.95


def _jwt(m: regex.Match[str]) -> tuple[str, float] | None:
    header = m.group().split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return ("JWT", 0.95) if isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded) else None


_URL_PLACEHOLDERS = frozenset({"password", "pass", "passwd", "pwd", "secret", "xxx", "xxxx", "****", "changeme",
                               "<password>", "user", "username", "pw", "p@ssw0rd", "mypassword", "yourpassword"})


def _url_credentials(m: regex.Match[str]) -> tuple[str, float] | None:
    value = m.group("v")
    if value.lower() in _URL_PLACEHOLDERS or value.startswith(("$", "{", "<", "%")) or len(value) < 4:
        return None
    return "PASSWORD", 0.9


_VENDOR = (
    r"(?:"
    r"(?P<AWS_ACCESS_KEY>(?:AKIA|ASIA)[A-Z2-7]{16})"
    r"|(?P<GITHUB_TOKEN>gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{70,100})"
    r"|(?P<GITLAB_TOKEN>glpat-[A-Za-z0-9_\-]{20,50})"
    r"|(?P<SLACK_TOKEN>xox[abposre]-(?:[A-Za-z0-9]{1,40}-){1,5}[A-Za-z0-9]{4,64})"
    r"|(?P<SLACK_WEBHOOK>https://hooks\.slack\.com/services/T[A-Z0-9]{6,12}/B[A-Z0-9]{6,12}/[A-Za-z0-9]{20,32})"
    r"|(?P<GOOGLE_API_KEY>AIza[0-9A-Za-z_\-]{35})"
    r"|(?P<STRIPE_KEY>(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,99})"
    r"|(?P<ANTHROPIC_API_KEY>sk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_\-]{80,110})"
    r"|(?P<OPENAI_API_KEY>sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,200})"
    r"|(?P<HUGGINGFACE_TOKEN>hf_[A-Za-z0-9]{34,40})"
    r"|(?P<NPM_TOKEN>npm_[A-Za-z0-9]{36})"
    r"|(?P<PYPI_TOKEN>pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,200})"
    r"|(?P<SENDGRID_KEY>SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43})"
    r"|(?P<TWILIO_KEY>SK[0-9a-f]{32})"
    r"|(?P<AZURE_STORAGE_KEY>AccountKey=[A-Za-z0-9+/]{86}==)"
    r")(?![A-Za-z0-9_\-])"
)
_PEM_LABEL = r"-----(?:BEGIN|END) (?:[A-Z0-9]{1,12} ){0,3}PRIVATE KEY(?: BLOCK)?-----"
_PRIVATE_KEY = (
    _PEM_LABEL.replace("(?:BEGIN|END)", "BEGIN")
    + r"(?:(?:\r?\n|\\r?\\n|[ \t]){1,3}(?:[A-Za-z0-9+/=]{1,80}|(?:Proc-Type|DEK-Info|Version|Comment):"
    r"[A-Za-z0-9 ,.:\-]{0,80})){0,64}"
    r"(?:(?:\r?\n|\\r?\\n|[ \t]){1,3}" + _PEM_LABEL.replace("(?:BEGIN|END)", "END") + ")?"
)
_KEYWORD = (
    r"(?i:(?P<k>api[_\-. ]?key|apikey|api[_\-. ]?secret|api[_\-. ]?token|secret[_\-. ]?key|"
    r"client[_\-. ]?secret|secret[_\-. ]?access[_\-. ]?key|access[_\-. ]?key(?:[_\-. ]?id)?|"
    r"auth[_\-. ]?token|access[_\-. ]?token|refresh[_\-. ]?token|bearer|token|secret|password|passwd|"
    r"passphrase|pwd|private[_\-. ]?key|credentials?)(?![a-z0-9]))"
    r"[\"']?(?:[ \t]{0,3}(?:[:=]|=>|:=|->)|[ \t]{1,3}(?i:is|was)(?![a-z])|[ \t])[ \t]{0,3}[\"'`]?"
    r"(?P<v>[A-Za-z0-9+/_\-.=~!@#$%^&*?]{6,200})"
)


def rules() -> tuple[PatternRule | AnchoredRule, ...]:
    """The secret rules, in priority order; vendor formats and keyword values share one anchor pass."""
    anchors = context_anchors()
    return (
        PatternRule(NAME, "PRIVATE_KEY", pattern=_PRIVATE_KEY, score=1.0, requires=("PRIVATE KEY",)),
        AnchoredRule(NAME, "API_KEY", anchors, group="vendor", pattern=_VENDOR, validate=_vendor),
        PatternRule(NAME, "JWT", pattern=(r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{8,2000}\.eyJ[A-Za-z0-9_\-]{8,4000}"
                                          r"\.[A-Za-z0-9_\-]{0,1000}(?![A-Za-z0-9_\-])"),
                    validate=_jwt, requires=("eyJ",)),
        PatternRule(NAME, "PASSWORD", validate=_url_credentials, requires=("://",), pattern=(
            r"(?<![\w+.\-])[A-Za-z][A-Za-z0-9+.\-]{1,20}://[^\s:/@]{1,64}:(?P<v>[^\s:/@]{1,128})@"
            r"[A-Za-z0-9.\-\[\]]{1,255}")),
        AnchoredRule(NAME, "SECRET", anchors, group="keyword", pattern=_KEYWORD, validate=_keyword_secret),
    )
