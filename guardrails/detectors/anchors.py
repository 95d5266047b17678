"""Context words of the PII and secrets detectors in one automaton: both detectors' anchored rules look
them up in the same `TextView`, so a text gets one Aho-Corasick pass for both."""

from __future__ import annotations

from functools import cache

from guardrails.keywords import KeywordAnchors

CONTEXT_WORDS: dict[str, tuple[str, ...]] = {
    "ssn": ("ssn", "social security", "ss#"),
    "phone": ("phone", "tel", "telephone", "mobile", "cell", "cellphone", "fax", "whatsapp", "sms", "call me",
              "text me", "reach me"),
    "dob": ("date of birth", "birth date", "birthdate", "born", "dob", "d.o.b", "birthday", "geburtsdatum",
            "geboren", "fecha de nacimiento", "date de naissance", "né le", "née le", "nee le", "ne le"),
    # Each vendor key format starts with one of these.
    "vendor": ("AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "xoxa-", "xoxb-",
               "xoxp-", "xoxo-", "xoxs-", "xoxr-", "xoxe-", "https://hooks.slack.com/", "AIza", "sk_live_",
               "sk_test_", "rk_live_", "rk_test_", "sk-", "hf_", "npm_", "pypi-", "SG.", "SK", "AccountKey="),
    # Words a secret's value follows ("api_key = ...", "password: ...").
    "keyword": ("api", "apikey", "secret", "client", "access", "auth", "refresh", "bearer", "token", "password",
                "passwd", "passphrase", "pwd", "private", "credential"),
}


@cache
def context_anchors() -> KeywordAnchors:
    """The shared, immutable automaton over CONTEXT_WORDS (built once per process)."""
    return KeywordAnchors(CONTEXT_WORDS)
