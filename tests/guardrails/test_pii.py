"""PII detector: true positives in realistic formats, near misses that validators must reject."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrails.chain import Step
from guardrails.detectors.base import RuleDetector
from guardrails.detectors.pii import NAME, VERSION, card_issuer, date_ok, iban_ok, luhn_ok, rules, ssn_ok

PII = RuleDetector(NAME, VERSION, rules())
STEP = Step(PII, threshold=0.5)


def found(text: str) -> list[tuple[str, str]]:
    """(type, matched text) of every PII finding at the default threshold."""
    out = []
    for f in PII.scan(text):
        if STEP.judge(f, text, None) is not None:
            out.append((f.type, text[f.start:f.end]))
    return out


@pytest.mark.parametrize(("text", "expected"), [
    ("write to jane.doe@example.com today", ("EMAIL", "jane.doe@example.com")),
    ("cc: Bob_Smith+tag@mail.example.co.uk.", ("EMAIL", "Bob_Smith+tag@mail.example.co.uk")),
    ("call +1 (415) 555-2671 now", ("PHONE_NUMBER", "+1 (415) 555-2671")),
    ("call (415) 555-2671 now", ("PHONE_NUMBER", "(415) 555-2671")),
    ("or 415-555-2671.", ("PHONE_NUMBER", "415-555-2671")),
    ("UK office +44 20 7946 0958", ("PHONE_NUMBER", "+44 20 7946 0958")),
    ("London 020 7946 0958", ("PHONE_NUMBER", "020 7946 0958")),
    ("Paris 06 12 34 56 78", ("PHONE_NUMBER", "06 12 34 56 78")),
    ("Tokyo +81 3-1234-5678", ("PHONE_NUMBER", "+81 3-1234-5678")),
    ("phone: 4155552671", ("PHONE_NUMBER", "4155552671")),
    ("card 4111 1111 1111 1111 exp 09/27", ("CREDIT_CARD", "4111 1111 1111 1111")),
    ("amex 378282246310005", ("CREDIT_CARD", "378282246310005")),
    ("mc 5555-5555-5555-4444", ("CREDIT_CARD", "5555-5555-5555-4444")),
    ("IBAN DE89 3704 0044 0532 0130 00 (EUR)", ("IBAN", "DE89 3704 0044 0532 0130 00")),
    ("pay GB82WEST12345698765432 now", ("IBAN", "GB82WEST12345698765432")),
    ("SSN 536-22-8412", ("US_SSN", "536-22-8412")),
    ("my social security number is 536228412", ("US_SSN", "536228412")),
    ("from 8.8.8.8 at noon", ("IP_ADDRESS", "8.8.8.8")),
    ("v6 2001:4860:4860::8888 ok", ("IP_ADDRESS", "2001:4860:4860::8888")),
    ("I was born on 12/03/1985 in Oslo", ("DATE_OF_BIRTH", "12/03/1985")),
    ("Date of birth: 3 March 1985", ("DATE_OF_BIRTH", "3 March 1985")),
    ("DOB 1985-03-12", ("DATE_OF_BIRTH", "1985-03-12")),
])
def test_pii_detector_finds_each_type_in_context(text: str, expected: tuple[str, str]) -> None:
    assert expected in found(text)


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 fails Luhn",              # invalid check digit
    "order 1234 5678 9012 3456 shipped",                # Luhn-valid? no issuer/Luhn: rejected
    "IBAN DE89 3704 0044 0532 0130 01 has a bad checksum",
    "SSN 000-12-3456 and 666-12-3456 and 912-34-5678 are never issued",
    "version 1.2.3 and 256.1.1.1 and 10.0.19041.1",
    "meeting at 12:30:45 tomorrow",
    "ISBN 978-3-16-148410-0",
    "the retina image icon@2x.png",
    "private 192.168.1.10 and loopback 127.0.0.1",
    "the meeting is on 12/03/2024",                     # a date, not a date of birth
    "timestamp 1700000000000 ms",
    "git clone https://user:pass@github.com/org/repo",  # URL credentials, not a mailbox
    "std::vector<int> and a::b in C++",
])
def test_pii_detector_ignores_near_misses(text: str) -> None:
    assert found(text) == []


def test_validators_follow_the_published_rules() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert card_issuer("378282246310005") == "amex" and card_issuer("9999999999999995") is None
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert not iban_ok("DE8937040044053201300")  # wrong length for DE
    assert ssn_ok("536228412") and not ssn_ok("000228412") and not ssn_ok("536008412")
    assert date_ok("March 3, 1985") and date_ok("1985-03-12") and not date_ok("13/13/1985")


def _luhn_number(body: str) -> str:
    digits = [int(c) for c in body]
    total = sum(d if i % 2 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    return body + str((10 - total % 10) % 10)


@settings(max_examples=200)
@given(body=st.text("0123456789", min_size=14, max_size=14), sep=st.sampled_from(["", " ", "-"]),
       words=st.sampled_from(["pay with", "card:", "Visa", "number"]))
def test_every_luhn_valid_visa_number_is_found_and_a_wrong_check_digit_never_is(body: str, sep: str,
                                                                               words: str) -> None:
    number = _luhn_number("4" + body)
    grouped = sep.join(number[i:i + 4] for i in range(0, 16, 4))
    assert ("CREDIT_CARD", grouped) in found(f"{words} {grouped} thanks")
    wrong = number[:-1] + str((int(number[-1]) + 1) % 10)
    bad = sep.join(wrong[i:i + 4] for i in range(0, 16, 4))
    assert not any(t == "CREDIT_CARD" for t, _ in found(f"{words} {bad} thanks"))


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_findings_always_lie_inside_the_text(text: str) -> None:
    for f in PII.scan(text):
        assert 0 <= f.start < f.end <= len(text)
