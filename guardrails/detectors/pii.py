"""Structured PII: e-mail, phone numbers, payment cards, IBANs, US SSNs, IP addresses, dates of birth.

Each type is a bounded pattern that finds candidates and a pure validator that cuts false positives: Luhn and
issuer ranges for cards, the ISO 13616 mod-97 checksum and per-country lengths for IBANs, SSA allocation
rules for SSNs, `ipaddress` for IPs, digit counts for phones, calendar checks for dates of birth.
"""

from __future__ import annotations

import ipaddress
import re

import regex

from guardrails.candidates import run_before, shape
from guardrails.detectors.anchors import context_anchors
from guardrails.keywords import AnchoredRule, RegexAnchors
from guardrails.rules import LOOKBACK, PatternRule

NAME = "pii"
VERSION = "1.0.0"
PLACEHOLDER_TYPES = ("EMAIL", "PHONE_NUMBER", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "DATE_OF_BIRTH")

# --- validators (pure, on the matched text) ---------------------------------------------------------

_NOT_DIGIT = regex.compile(r"\D")


def value_of(m: regex.Match[str]) -> str:
    """The match's value group `v` when the pattern has one and it took part, else the whole match."""
    return m.group("v") if "v" in m.re.groupindex and m.start("v") >= 0 else m.group()


def has_context(m: regex.Match[str]) -> bool:
    return "v" in m.re.groupindex and m.start("v") >= 0


def digits_of(text: str) -> str:
    return _NOT_DIGIT.sub("", text)


# Each ASCII digit's byte -> its Luhn contribution when doubled (2d, less 9 above 9).
_LUHN_DOUBLED = bytes((d * 2 - 9 if d > 4 else d * 2) if 48 <= c <= 57 and (d := c - 48) >= 0 else 0 for c in range(256))


def luhn_ok(number: str) -> bool:
    """True when the digit string passes the Luhn (mod 10) check."""
    if number.isascii() and number.isdigit():  # every other byte as is, the rest doubled via a table
        b = number.encode("ascii")
        plain = b[-1::-2]
        return (sum(plain) - 48 * len(plain) + sum(b[-2::-2].translate(_LUHN_DOUBLED))) % 10 == 0
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_issuer(number: str) -> str | None:
    """The card network a digit string's issuer prefix and length belong to, or None."""
    n = len(number)
    p2, p4 = int(number[:2]), int(number[:4])
    if number[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (number.startswith("6011") or p2 == 65 or 644 <= int(number[:3]) <= 649) and 16 <= n <= 19:
        return "discover"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (300 <= int(number[:3]) <= 305 or p2 in (36, 38, 39)) and 14 <= n <= 19:
        return "diners"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if (p2 == 50 or 56 <= p2 <= 69) and 12 <= n <= 19:
        return "maestro"
    return None


def _card_number_ok(number: str) -> bool:
    return (13 <= len(number) <= 19 and len(set(number)) > 1 and luhn_ok(number)
            and card_issuer(number) is not None)


def _card(m: regex.Match[str]) -> tuple[str, float, int, int] | None:
    raw = m.group()
    seps = {c for c in raw if not c.isdigit()}
    if len(seps) > 1:
        return None
    if not seps:
        return ("CREDIT_CARD", 0.95, m.start(), m.end()) if _card_number_ok(raw) else None
    # A grouped number may run into neighbouring number groups ("0 4111 1111 1111 1111 7"): try the
    # windows of whole groups, longest first, then leftmost (those of 13 to 19 digits: no other can pass).
    parts = raw.split(seps.pop())
    offsets, pos = [], 0
    for g in parts:
        offsets.append(pos)
        pos += len(g) + 1
    k = len(parts)
    for size in range(k, 0, -1):
        for i in range(k - size + 1):
            number = "".join(parts[i:i + size])
            if 13 <= len(number) <= 19 and _card_number_ok(number):
                return "CREDIT_CARD", 0.95, m.start() + offsets[i], m.start() + offsets[i + size - 1] + len(parts[i + size - 1])
    return None


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(iban: str) -> bool:
    """True for a compact upper-case IBAN with a known country length and a valid mod-97 checksum."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _iban(m: regex.Match[str]) -> tuple[str, float, int, int] | None:
    # The pattern may run on into following upper-case words ("... 0130 00 EUR"): drop trailing groups.
    raw = m.group()
    end = len(raw)
    while end >= 15:
        cand = raw[:end].replace(" ", "")
        if iban_ok(cand):
            return "IBAN", 0.95, m.start(), m.start() + end
        cut = raw.rfind(" ", 0, end)
        if cut < 0:
            return None
        end = cut
    return None


_BAD_SSNS = frozenset({"078051120", "219099999", "123456789", "111111111", "333333333"})


def ssn_ok(number: str) -> bool:
    """SSA rules: 9 digits; area not 000, 666 or 9xx; group not 00; serial not 0000; no known fakes."""
    if len(number) != 9 or number in _BAD_SSNS:
        return False
    area, group, serial = number[:3], number[3:5], number[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _ssn(m: regex.Match[str]) -> tuple[str, float] | None:
    raw = value_of(m)
    if " " in raw and "-" in raw:
        return None
    return ("US_SSN", 0.9) if ssn_ok(digits_of(raw)) else None


def _ipv4(m: regex.Match[str]) -> tuple[str, float] | None:
    try:
        ip = ipaddress.IPv4Address(m.group())
    except ValueError:
        return None  # an octet over 255, or a leading zero
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved or str(ip) == "255.255.255.255":
        return "IP_ADDRESS", 0.2
    if ip.is_private or ip.is_link_local:
        return "IP_ADDRESS", 0.4  # internal addresses identify no one: reported below the default threshold
    return "IP_ADDRESS", 0.9


def _ipv6(m: regex.Match[str]) -> tuple[str, float] | None:
    raw = m.group()
    if sum(1 for g in raw.split(":") if g) < 3:
        return None  # "a::b", "fe80::1": too short to tell from code or times
    try:
        ip = ipaddress.IPv6Address(raw)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        return "IP_ADDRESS", 0.2
    if ip.is_private or ip.is_link_local or ip.is_site_local:
        return "IP_ADDRESS", 0.4
    return "IP_ADDRESS", 0.9


def _phone(m: regex.Match[str]) -> tuple[str, float] | None:
    raw = value_of(m)
    number = digits_of(raw)
    if not 7 <= len(number) <= 15 or len(set(number)) < 3:
        return None
    if raw.count("(") != raw.count(")"):
        return None
    return "PHONE_NUMBER", (0.85 if has_context(m) else 0.8)


_IBAN_GROUPS_BEFORE = regex.compile(r"(?:^|\s)[A-Z]{2}\d{2}(?: [A-Z0-9]{4}){0,7} $")


def _national_phone(m: regex.Match[str]) -> tuple[str, float] | None:
    number = digits_of(m.group())
    if not 9 <= len(number) <= 11 or len(set(number)) < 3:
        return None
    if _IBAN_GROUPS_BEFORE.search(m.string, max(0, m.start() - LOOKBACK), m.start()):
        return None  # the tail of an IBAN written in groups ("DE89 3704 0044 0532 ...")
    return "PHONE_NUMBER", 0.7


_MONTHS = {m: i for i, names in enumerate(
    (("jan", "january"), ("feb", "february"), ("mar", "march"), ("apr", "april"), ("may",), ("jun", "june"),
     ("jul", "july"), ("aug", "august"), ("sep", "sept", "september"), ("oct", "october"),
     ("nov", "november"), ("dec", "december")), start=1) for m in names}
_DATE_PARTS = regex.compile(r"\d{1,4}|[A-Za-z]+")


def date_ok(text: str) -> bool:
    """True when `text` reads as a calendar date (day/month in either order) with a 19xx/20xx or 2-digit year."""
    parts = _DATE_PARTS.findall(text)
    nums = [int(p) for p in parts if p.isdigit()]
    month_names = [_MONTHS[p.lower().rstrip(".")] for p in parts if p.lower().rstrip(".") in _MONTHS]
    if month_names and len(nums) >= 2:
        day, year = nums[0], nums[-1]
        return 1 <= day <= 31 and (1900 <= year <= 2099)
    if len(nums) != 3:
        return False
    a, b, c = nums
    if a >= 1000:  # ISO order
        return 1900 <= a <= 2099 and 1 <= b <= 12 and 1 <= c <= 31
    year_ok = 1900 <= c <= 2099 or c <= 99
    return year_ok and ((1 <= a <= 31 and 1 <= b <= 12) or (1 <= a <= 12 and 1 <= b <= 31))


def _dob(m: regex.Match[str]) -> tuple[str, float] | None:
    return ("DATE_OF_BIRTH", 0.85) if date_ok(m.group("v")) else None


_TWO_COLONS = re.compile(r":[0-9A-Fa-f]{0,4}:")
_AREA_CODE = re.compile(r"\([2-9]\d\d\)")  # in every "(555) 123-4567": prose in parentheses is skipped
_FILE_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "css", "js", "ts", "py",
                        "json", "yaml", "yml", "txt", "md", "html", "pdf", "zip"})


def _email(m: regex.Match[str]) -> tuple[str, float] | None:
    raw = m.group()
    local, _, domain = raw.rpartition("@")
    if ".." in local or domain.rsplit(".", 1)[-1].lower() in _FILE_TLDS:
        return None  # "icon@2x.png" is a file name
    before = m.string[max(0, m.start() - LOOKBACK):m.start()]
    token = before[max(before.rfind(c) for c in " \t\n\"'<(") + 1:]
    if "://" in token:
        return None  # "https://user:token@host" is a URL's credentials (the secrets detector's), not a mailbox
    return "EMAIL", 0.95


# --- patterns ---------------------------------------------------------------------------------------

_MONTH = r"(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[A-Za-z]{0,6}\.?"
_DATE = (r"(?:\d{1,2}[/.\-]\d{1,2}[/.\-](?:19|20)?\d{2}"
         r"|(?:19|20)\d{2}[/.\-]\d{1,2}[/.\-]\d{1,2}"
         rf"|\d{{1,2}}(?:st|nd|rd|th)?[ ](?:of[ ])?{_MONTH},?[ ](?:19|20)\d{{2}}"
         rf"|{_MONTH}[ ]\d{{1,2}}(?:st|nd|rd|th)?,?[ ](?:19|20)\d{{2}})")


def rules() -> tuple[PatternRule | AnchoredRule, ...]:
    """The PII rules, in priority order (the chain keeps the first type when spans overlap).

    Number-shaped rules are tried only at the start of each digit run, context rules only at their
    keywords: two shared passes over the text instead of one regex scan per rule.
    """
    # Every number-shaped rule needs a digit run of 13+ or one followed by a separator and a digit: in an
    # ASCII text's shape, "dsd" or 13 d's (checked before the anchor pass runs at all).
    digits = RegexAnchors(r"\d(?<!\d\d)(?=\d{12}|\d{0,15}[ .\-/]\d)", 18,
                          shape=rb"d(?<!dd)(?=d{12}|d{0,15}sd)")  # the same, in an ASCII text's shape
    clusters = (b"dsd", b"d" * 13)
    words = context_anchors()
    return (
        # A match starts where the run of [\w.%+-] before its "@" starts (its look-behind forbids one before
        # it, and every local-part character is one), at most 64 characters before the "@".
        PatternRule(NAME, "EMAIL", validate=_email, requires=("@",), candidates=run_before("@", r"\w.%+\-", 64),
                    pattern=(
            r"(?<![\w.%+\-])(?<!//)[A-Za-z0-9](?:[A-Za-z0-9._%+\-]{0,62}[A-Za-z0-9_%+\-])?@"
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,4}[A-Za-z]{2,24}(?![\w\-]|\.[A-Za-z0-9])")),
        AnchoredRule(NAME, "CREDIT_CARD", digits, validate=_card, requires_shape=clusters, pattern=(  # not inside an IBAN: "DE25 6782..."
            r"\d(?<![A-Za-z\-.,]\d)(?<![A-Z]{2}\d{2} \d)(?:[ \-]?\d){12,18}(?![\d]|[.,]\d)")),
        PatternRule(NAME, "IBAN", validate=_iban, requires_digit=True, requires_shape=(b"UUdd",),
                    candidates=shape(rb"UU[dn][dn]"), pattern=(
            r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?:[ ]?[A-Z0-9]){11,30}(?![A-Za-z0-9])")),
        AnchoredRule(NAME, "US_SSN", digits, validate=_ssn, requires_shape=clusters, pattern=(
            r"\d(?<!-\d)\d{2}[\- ]\d{2}[\- ]\d{4}(?![\d\-]|\.\d)")),
        AnchoredRule(NAME, "US_SSN", words, group="ssn", validate=_ssn, pattern=(
            r"(?i:ssn|social security(?: number| no\.?| #)?|ss#)(?![a-z])[^\d\n]{0,15}"
            r"(?P<v>\d{3}[\- ]?\d{2}[\- ]?\d{4})(?![\d\-])")),
        PatternRule(NAME, "PHONE_NUMBER", validate=_phone, requires=("+",), pattern=(
            r"\+(?<![\w+\-.]\+)[1-9]\d{0,2}[ .\-]?(?:\(\d{1,4}\)[ .\-]?)?\d{1,5}(?:[ .\-]?\d{1,5}){0,5}"
            r"(?![\d\-]|\.\d)")),
        PatternRule(NAME, "PHONE_NUMBER", validate=_phone, requires=("(",), requires_re=_AREA_CODE, pattern=(
            r"\((?<![\w+\-.]\()[2-9]\d{2}\)[ .\-]?[2-9]\d{2}[ .\-]\d{4}(?![\d\-]|\.\d)")),
        AnchoredRule(NAME, "PHONE_NUMBER", digits, validate=_phone, requires_shape=clusters, pattern=(
            r"\d(?<![\w+\-.]\d)(?:(?<=1)[ .\-](?:\([2-9]\d{2}\)[ .\-]?|[2-9]\d{2}[ .\-])|(?<=[2-9])\d{2}[ .\-])"
            r"[2-9]\d{2}[ .\-]\d{4}(?![\d\-]|\.\d)")),
        AnchoredRule(NAME, "PHONE_NUMBER", digits, validate=_national_phone, first="0", requires_shape=clusters, pattern=(
            # trunk-prefix national numbers: "020 7946 0958", "030/1234567", "06 12 34 56 78"
            r"0(?<![\w+\-./:]0)(?:[1-9](?:[ .\-]\d{2}){4}|\d{1,4}[ \-/]\d{3,8}(?:[ \-/]\d{2,8}){0,3})"
            r"(?![\d\-/:]|\.\d)")),
        AnchoredRule(NAME, "PHONE_NUMBER", words, group="phone", validate=_phone, pattern=(
            r"(?i:phone|tel|telephone|mobile|cell|cellphone|fax|whatsapp|sms|call me|text me|reach me)(?![a-z])"
            r"[^\d\n+]{0,12}(?P<v>\+?\d[\d ().\-]{5,18}\d)(?![\d\-])")),
        AnchoredRule(NAME, "IP_ADDRESS", digits, validate=_ipv4, requires=(".",), requires_shape=clusters, pattern=(
            r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d)")),
        # Two of its colons lie at most four hex digits apart: one cheap `re` search skips prose with colons.
        PatternRule(NAME, "IP_ADDRESS", validate=_ipv6, requires=(":",), requires_re=_TWO_COLONS, pattern=(
            r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
            r"(?![\w:]|\.\w)")),
        AnchoredRule(NAME, "DATE_OF_BIRTH", words, group="dob", validate=_dob, pattern=(
            r"(?i:date of birth|birth ?date|born(?: on| in)?|dob|d\.o\.b\.?|birthday(?: is)?|geburtsdatum|"
            r"geboren(?: am)?|fecha de nacimiento|date de naissance|n[ée]e? le)(?![a-z])"
            r"[ \t:,\-]{0,4}(?:(?:was|is|on|am|el|le)[ \t]{1,3})?"
            rf"(?P<v>{_DATE})(?![\d])")),
    )
