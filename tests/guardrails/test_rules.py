"""Span rules: what a stream-safe pattern is, keyword matching, and case folding that keeps offsets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardrails.keywords import KeywordRule
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
