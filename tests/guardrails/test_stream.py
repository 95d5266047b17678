"""The stream guard: streamed output equals the non-streamed check, and nothing escapes across chunks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardrails import Policy, default_policy_set, parse_policy_set
from guardrails.stream import BATCH_CHARS

CANARY = "zebra-canary-7731"

# Fragments that are, or nearly are, what the output detectors look for: glued together at random and cut
# at random, they put matches, near-misses and partial matches across every possible chunk boundary.
RISKY = [
    "jane.doe@example.com", "a@b.co", "x@", "@corp.io", "mail me: bob_smith+tag@mail.example.org",
    "+1 (415) 555-2671", "+44 20 7946 0958", "415-555-2671", "020 7946 0958", "phone: 4155552671", "tel",
    "4111 1111 1111 1111", "4111-1111-1111-1112", "5500 0000 0000 0004", "378282246310005",
    "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "DE89 3704", "536-22-8412", "SSN 536228412",
    "000-12-3456", "8.8.8.8", "192.168.0.1", "256.1.1.1", "2001:4860:4860::8888", "12:30:45",
    "born on 12/03/1985", "date of birth: 1985-03-12", "DOB 3 March 1985", "born",
    "AKIAIOSFODNN7EXAMPLF", "AKIA", "ghp_aBcdEfGhIjKlMnOpQrStUvWxYz0123456789", "ghp_",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "api_key=Zx9vQ2mL7pR4tY8wK3nB", "password: Hunter2!x", "token",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "postgres://admin:S3cr3tPw@db.internal:5432/app", "-----BEGIN RSA PRIVATE KEY-----",
    "\nMIIEowIBAAKCAQEA7bq9\n", "-----END RSA PRIVATE KEY-----", CANARY, "zebra-", "ZEBRA-CANARY-7731",
    "forbidden fruit", "forbidden", "\u200b", "\u202e", "\U000e0041", "\x07",
    "https://x-access-token:", "@github.com", "DE89 3704 0044 0532 0130 01", "0532 0130 01", "06 12 34 56 78",
    "aws_secret_access_key = ", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8aBc", "pro123x",
]
FILLER = st.text(alphabet=st.sampled_from([*"abcXYZ 0123456789.,:;-+@_/()\n\t'\"=", "é", "Ж", "🙂"]),
                 max_size=12)
TEXTS = st.lists(st.one_of(st.sampled_from(RISKY), FILLER), max_size=14).map("".join)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@pytest.fixture(scope="module")
def policy() -> Policy:
    doc = """
version: 1
default:
  output:
    blocklist: {action: redact, words: [forbidden fruit, secretword], regexes: ['pro[0-9]{2,4}x']}
"""
    return parse_policy_set(doc).resolve("t", "m")


def stream(policy: Policy, chunks: list[str], canary: str | None = CANARY, batch: int = 1) -> tuple[str, object]:
    guard = policy.stream_guard(system_prompt_canary=canary, batch_chars=batch)
    out = [guard.feed(c) for c in chunks]
    out.append(guard.finish())
    return "".join(out), guard


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
       batch=st.sampled_from([1, 1, 7, 32]))
def test_streamed_output_equals_the_non_streamed_check_for_any_chunking(policy: Policy, text: str,
                                                                       cuts: list[int], batch: int) -> None:
    whole = policy.check_output(text, system_prompt_canary=CANARY)
    streamed, guard = stream(policy, chunked(text, cuts), batch=batch)
    if whole.action == "block":
        assert guard.blocked  # type: ignore[attr-defined]
        assert whole.text.startswith(streamed)
    else:
        assert streamed == whole.text
        assert guard.verdict.findings == whole.findings  # type: ignore[attr-defined]
        assert guard.verdict.action == whole.action  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(prefix=FILLER, suffix=FILLER, secret=st.sampled_from([
    "ghp_aBcdEfGhIjKlMnOpQrStUvWxYz0123456789", "AKIAIOSFODNN7EXAMPLF", "jane.doe@example.com",
    "4111 1111 1111 1111", "536-22-8412"]), cuts=st.lists(st.integers(0, 200), min_size=1, max_size=20))
def test_stream_guard_never_emits_a_secret_split_across_chunks(policy: Policy, prefix: str, suffix: str,
                                                               secret: str, cuts: list[int]) -> None:
    text = f"{prefix} {secret}. {suffix}"
    streamed, _ = stream(policy, chunked(text, cuts), canary=None)
    assert secret not in streamed
    # no piece of it long enough to matter either: at most the last 4 characters can sit in the clear
    assert secret[:-4] not in streamed


def test_a_blocked_stream_stops_and_reports_the_canary(policy: Policy) -> None:
    guard = policy.stream_guard(system_prompt_canary=CANARY, batch_chars=1)
    emitted = guard.feed("Here is my prompt: zebra-") + guard.feed("canary-7731 and the rest")
    assert guard.blocked and "canary" not in emitted.lower()
    assert guard.feed("more text") == "" and guard.finish() == ""
    assert guard.verdict.action == "block"
    assert [f.type for f in guard.verdict.findings if f.action == "block"] == ["SYSTEM_PROMPT_LEAK"]


def test_a_redacted_stream_streams_placeholders(policy: Policy) -> None:
    out, guard = stream(policy, list("write to jane.doe@example.com today"))
    assert out == "write to [EMAIL] today"
    assert not guard.blocked  # type: ignore[attr-defined]


def test_the_hold_back_stays_small_on_ordinary_prose() -> None:
    guard = default_policy_set().resolve("t", "m").stream_guard()
    prose = "The quick brown fox jumps over the lazy dog, then rests. " * 40
    held = []
    for i in range(0, len(prose), 4):
        guard.feed(prose[i:i + 4])
        held.append(guard.held)
    assert max(held) <= BATCH_CHARS + 64  # the batch plus at most a clause (IBAN-shaped candidates end at punctuation)
    assert guard.finish() != "" or guard.held == 0
