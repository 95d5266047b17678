"""Secrets detector: vendor formats, key blocks, JWTs, keyword values; placeholders and code stay clean."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrails.detectors.base import RuleDetector
from guardrails.detectors.secrets import NAME, VERSION, generated_looking, rules, shannon_entropy

SECRETS = RuleDetector(NAME, VERSION, rules())


def found(text: str) -> list[tuple[str, str]]:
    return [(f.type, text[f.start:f.end]) for f in SECRETS.scan(text)]


JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
KEY_BLOCK = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq98ZqQ3bL0pX1kH2s\nq9W3e4r5t6y7u8i9o0p1a2s3d4f5g6h\n"
             "-----END RSA PRIVATE KEY-----")


@pytest.mark.parametrize(("text", "expected"), [
    ("key AKIAIOSFODNN7EXAMPLF here", ("AWS_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLF")),
    ("export GITHUB_TOKEN=ghp_aBcdEfGhIjKlMnOpQrStUvWxYz0123456789", ("GITHUB_TOKEN", "ghp_aBcdEfGhIjKlMnOpQrStUvWxYz0123456789")),
    ("token xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
     ("SLACK_TOKEN", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx")),
    ("maps AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q ok", ("GOOGLE_API_KEY", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q")),
    ('stripe.api_key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"', ("STRIPE_KEY", "sk_live_4eC39HqLyjWDarjtT1zdp7dc")),
    ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567 is my token", ("HUGGINGFACE_TOKEN", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567")),
    (f"Authorization: Bearer {JWT}", ("JWT", JWT)),
    (f"why does ssh reject\n{KEY_BLOCK}\nthanks", ("PRIVATE_KEY", KEY_BLOCK)),
    ("postgres://admin:S3cr3tPw@db.internal:5432/app", ("PASSWORD", "S3cr3tPw")),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8aBc", ("SECRET", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8aBc")),
    ("the database password is Summer2024!x, rotate it", ("PASSWORD", "Summer2024!x")),
    ("DB_PASSWORD=Falcon8812#Q", ("PASSWORD", "Falcon8812#Q")),
])
def test_secrets_detector_finds_real_formats(text: str, expected: tuple[str, str]) -> None:
    assert expected in found(text)


@pytest.mark.parametrize("text", [
    "set api_key = os.environ['OPENAI_API_KEY'] instead",
    "use YOUR_API_KEY as a placeholder",
    "the token limit is 4096 and the password is incorrect",
    "our key placeholder is sk-xxxxxxxxxxxxxxxxxxxxxxxx in the docs",
    "token = getToken() and secret = config.secret_value",
    "postgres://user:password@localhost/db",
    "Can you explain what a JWT is and how the signature is verified?",
    "-----BEGIN PUBLIC KEY----- is fine to share",
    "commit 3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39 fixed it",
])
def test_secrets_detector_leaves_placeholders_code_and_talk_alone(text: str) -> None:
    assert found(text) == []


def test_generated_looking_separates_keys_from_words() -> None:
    assert generated_looking("q9W3e4r5t6y7u8i9o0p1")
    assert not generated_looking("incorrect") and not generated_looking("process.env.API_KEY")
    assert not generated_looking("xxxxxxxxxxxxxxxx") and not generated_looking("your-api-key-here")
    assert generated_looking("Hunter2!", password=True) and not generated_looking("hunter", password=True)


@settings(max_examples=100)
@given(st.text(min_size=1, max_size=64))
def test_entropy_is_bounded_by_the_alphabet(text: str) -> None:
    import math

    assert 0.0 <= shannon_entropy(text) <= math.log2(len(set(text))) + 1e-9
