"""Span rules: what a stream-safe pattern is, keyword matching, and case folding that keeps offsets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardrails.keywords import KeywordAnchors, KeywordRule, _is_word
from guardrails.rules import BadPattern, PatternRule, TextView, UnboundedPattern, fold, pattern_shape


@pytest.mark.parametrize("pattern", [r"a.*b", r"x+", r"\d{3,}", r"(a)\1", r"(?<=a{70})b"])
def test_patterns_that_could_hold_a_stream_forever_are_refused(pattern: str) -> None:
    with pytest.raises(UnboundedPattern):
        PatternRule("t", "T", pattern=pattern)


def test_a_pattern_that_does_not_parse_is_refused() -> None:
    with pytest.raises(BadPattern, match="not a valid regular expression"):
        PatternRule("t", "T", pattern="(oops")


def test_pattern_shape_knows_width_lookahead_and_stoppers() -> None:
    width, lookahead, stopper = pattern_shape(r"\d{3}-\d{4}(?!\d)")
    assert width == 9 and lookahead == 1 and stopper is not None
    assert pattern_shape(r"a.{0,5}")[2] is None  # "." consumes anything: no stopper


def test_keyword_rule_matches_whole_words_case_insensitively_and_reports_overlaps() -> None:
    rule = KeywordRule("blocklist", "BLOCKLIST", ["red fox", "fox", "foxglove"])
    text = "A Red Fox, a foxglove, firefox and fox_trot."
    spans = [text[f.start:f.end] for f in rule.scan(TextView(text))]
    assert spans == ["Red Fox", "Fox", "foxglove", "fox"]


@given(st.text(max_size=100))
def test_fold_keeps_one_character_per_character(text: str) -> None:
    folded = fold(text)
    assert len(folded) == len(text)
    assert fold(text[:10]) + fold(text[10:]) == folded  # local: a stream can fold piece by piece


_TERMS = {"ctx": ("phone", "tel", "cell", "ss#", "d.o.b", "sk-", "né le", "call me", "https://hooks.x/", "AccountKey="),
          "odd": ("#tag", "@user", "über cool", "!!", "e.g.", "a-b")}
_PIECES = ["phone", "tel", "cell", "ss#", "d.o.b", "sk-", "né le", "call me", "hooks.x/", "#tag", "@user", "über",
           "cool", "!!", "e.g.", "a-b", "x", "é", "ñ", "_", " ", "-", ".", "\n", "7", "\u200b", "数", "TEL", "Né"]


@given(st.lists(st.sampled_from(_PIECES), max_size=25), st.integers(0, 4))
def test_keyword_anchors_find_exactly_the_word_start_occurrences_of_a_plain_automaton(pieces: list[str],
                                                                                      start: int) -> None:
    # The search after a word-start mark must agree, in order, with scanning every position and keeping
    # occurrences not preceded by a letter or digit (the definition), on ASCII and non-ASCII text alike.
    text = "".join(pieces)
    anchors = KeywordAnchors(_TERMS)
    view = TextView(text, None, min(start, len(text)))
    f = view.folded
    expected = [(end - n + 1, end + 1, names) for end, (n, names) in anchors.auto.iter(f, view.start)
                if not (end - n + 1 > 0 and _is_word(f[end - n]))]
    assert anchors._found(view) == expected


@given(st.text(alphabet=st.sampled_from("ab AZ09\x1c\x1f\x07\t\n-./é"), max_size=60))
def test_text_view_digit_and_re_safety_shortcuts_agree_with_their_definitions(text: str) -> None:
    view = TextView(text)
    assert view.has_digit == any(c.isdigit() for c in text)
    assert view.re_safe == (text.isascii() and not any(c in text for c in "\x1c\x1d\x1e\x1f"))
