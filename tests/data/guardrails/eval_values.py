"""Synthetic sensitive values for the guardrail evaluation set: valid by construction (Luhn, mod-97, SSA
rules, real key formats), and near misses that must not be flagged. Deterministic given the `Random`."""

from __future__ import annotations

import base64
import json
import string
from random import Random

FIRST = ["maria", "john", "aisha", "wei", "lucas", "sofia", "omar", "emma", "raj", "chloe", "pedro", "yuki",
         "fatima", "noah", "ingrid", "kwame", "elena", "david", "priya", "tomas", "amara", "jonas", "lea", "ivan"]
LAST = ["garcia", "smith", "khan", "zhang", "martin", "rossi", "haddad", "brown", "patel", "dubois", "silva",
        "tanaka", "ali", "johnson", "larsen", "mensah", "popescu", "cohen", "sharma", "novak", "okafor", "weber"]
DOMAINS = ["gmail.com", "outlook.com", "proton.me", "acme-corp.io", "example.org", "uni-heidelberg.de",
           "mail.company.co.uk", "fastmail.fm", "startup.ai", "hospital.nhs.uk", "yahoo.fr", "web.de"]


def luhn_complete(prefix: str, length: int, rng: Random) -> str:
    """A digit string of `length` starting with `prefix` whose last digit makes the Luhn sum valid."""
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def card(rng: Random, *, valid: bool = True) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                 ("6011", 16), ("65", 16), ("3530", 16), ("4", 13)])
    number = luhn_complete(prefix, length, rng)
    if not valid:  # break the check digit
        number = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
    sep = rng.choice(["", " ", "-", " "])
    if length == 15:
        groups = [number[:4], number[4:10], number[10:]]
    else:
        groups = [number[i:i + 4] for i in range(0, length, 4)]
    return sep.join(groups)


IBAN_FORMATS = {"DE": "8n10n", "GB": "4a14n", "FR": "10n11c2n", "NL": "4a10n", "ES": "20n", "IT": "1a10n12c",
                "BE": "12n", "CH": "5n12c", "AT": "16n", "PL": "24n"}


def iban(rng: Random, *, valid: bool = True, spaced: bool | None = None) -> str:
    country = rng.choice(sorted(IBAN_FORMATS))
    bban = ""
    for count, kind in _iban_parts(IBAN_FORMATS[country]):
        alphabet = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}[kind]
        bban += "".join(rng.choice(alphabet) for _ in range(count))
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in moved)) % 97
    if not valid:
        check = (check + rng.randint(1, 50)) % 97 or 1
    compact = f"{country}{check:02d}{bban}"
    if spaced if spaced is not None else rng.random() < 0.6:
        return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    return compact


def _iban_parts(fmt: str) -> list[tuple[int, str]]:
    out, num = [], ""
    for ch in fmt:
        if ch.isdigit():
            num += ch
        else:
            out.append((int(num), ch))
            num = ""
    return out


def ssn(rng: Random, *, valid: bool = True, sep: str = "-") -> str:
    if valid:
        area = rng.choice([a for a in range(1, 900) if a != 666])
        group, serial = rng.randint(1, 99), rng.randint(1, 9999)
    else:
        area, group, serial = rng.choice([(0, rng.randint(1, 99), rng.randint(1, 9999)),
                                          (666, rng.randint(1, 99), rng.randint(1, 9999)),
                                          (rng.randint(900, 999), rng.randint(1, 99), rng.randint(1, 9999)),
                                          (rng.randint(1, 665), 0, rng.randint(1, 9999))])
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def phone(rng: Random) -> str:
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    area = str(rng.randint(201, 989))
    exch = str(rng.randint(201, 989))
    return rng.choice([
        f"({area}) {exch}-{d(4)}", f"{area}-{exch}-{d(4)}", f"{area}.{exch}.{d(4)}", f"+1 {area} {exch} {d(4)}",
        f"+1-{area}-{exch}-{d(4)}", f"+44 20 {d(4)} {d(4)}", f"+44 7{d(3)} {d(6)}", f"020 {d(4)} {d(4)}",
        f"07{d(3)} {d(6)}", f"+49 30 {d(8)}", f"+49 151 {d(8)}", f"030 {d(8)}", f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"06 {d(2)} {d(2)} {d(2)} {d(2)}", f"+91 9{d(4)} {d(5)}", f"+81 3-{d(4)}-{d(4)}", f"+61 2 {d(4)} {d(4)}",
        f"+34 6{d(2)} {d(3)} {d(3)}", f"+31 6 {d(8)}", f"+55 11 9{d(4)}-{d(4)}"])


def email(rng: Random) -> str:
    f, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice([f"{f}.{last}", f"{f}{last[0]}", f"{f[0]}{last}", f"{f}_{last}{rng.randint(1, 99)}",
                        f"{f}+news", f"{last}.{f}"])
    if rng.random() < 0.15:
        local = local.capitalize()
    return f"{local}@{rng.choice(DOMAINS)}"


def ipv4(rng: Random) -> str:
    while True:
        a = rng.choice([8, 23, 31, 45, 52, 66, 81, 93, 104, 142, 151, 185, 203, 212])
        ip = f"{a}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        if not ip.startswith("203.0.113."):
            return ip


def ipv6(rng: Random) -> str:
    groups = [f"{rng.randint(0, 0xffff):x}" for _ in range(8)]
    groups[0] = rng.choice(["2001", "2a00", "2606", "2a01", "2600", "2404"])
    if rng.random() < 0.5:
        i = rng.randint(3, 6)
        return ":".join(groups[:i]) + "::" + groups[-1]
    return ":".join(groups)


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def date(rng: Random, year_range: tuple[int, int] = (1940, 2005)) -> str:
    y, m, dd = rng.randint(*year_range), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([f"{m:02d}/{dd:02d}/{y}", f"{dd:02d}.{m:02d}.{y}", f"{y}-{m:02d}-{dd:02d}",
                       f"{dd} {MONTHS[m - 1]} {y}", f"{MONTHS[m - 1]} {dd}, {y}", f"{dd}/{m}/{y}",
                       f"{MONTHS[m - 1][:3]} {dd}, {y}"])


def _token(rng: Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits


def secret(rng: Random, kind: str) -> str:
    """A syntactically real secret of `kind` (the detector type it should be reported as)."""
    if kind == "AWS_ACCESS_KEY":
        return rng.choice(["AKIA", "ASIA"]) + _token(rng, string.ascii_uppercase + "234567", 16)
    if kind == "GITHUB_TOKEN":
        return rng.choice(["ghp_", "gho_", "ghs_"]) + _token(rng, ALNUM, 36)
    if kind == "SLACK_TOKEN":
        return f"xoxb-{_token(rng, string.digits, 12)}-{_token(rng, string.digits, 13)}-{_token(rng, ALNUM, 24)}"
    if kind == "GOOGLE_API_KEY":
        return "AIza" + _token(rng, ALNUM + "_-", 35)
    if kind == "STRIPE_KEY":
        return rng.choice(["sk_live_", "sk_test_", "rk_live_"]) + _token(rng, ALNUM, 24)
    if kind == "OPENAI_API_KEY":
        return "sk-proj-" + _token(rng, ALNUM, 20) + _token(rng, string.digits, 4) + _token(rng, ALNUM, 24)
    if kind == "HUGGINGFACE_TOKEN":
        return "hf_" + _token(rng, ALNUM, 34)
    if kind == "JWT":
        header = {"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"}
        payload = {"sub": str(rng.randint(10**6, 10**9)), "name": rng.choice(FIRST), "iat": rng.randint(1.6e9, 1.8e9)}
        enc = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()  # noqa: E731
        return f"{enc(header)}.{enc(payload)}.{_token(rng, ALNUM + '_-', 43)}"
    if kind == "PRIVATE_KEY":
        label = rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
        lines = [_token(rng, ALNUM + "+/", 64) for _ in range(rng.randint(3, 8))]
        return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"
    if kind == "SECRET":
        return _token(rng, ALNUM, rng.randint(24, 40))
    if kind == "PASSWORD":
        word = rng.choice(["Summer", "Winter", "Dragon", "Sunset", "Falcon", "Rocket", "Maple", "Ocean"])
        return f"{word}{rng.randint(10, 9999)}{rng.choice('!#$%&*?')}{rng.choice(['', 'x', 'Q', 'zz'])}"
    raise ValueError(kind)
