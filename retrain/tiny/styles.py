"""The answer styles the tiny model's corpus mixes, and how to recognise them in generated text.

For every user question the corpus holds answers in each style, in equal numbers, so the base model
samples all of them and a preference between them (e.g. for concise, polite answers) is learnable.
Every phrasing of a style opens with one of that style's openers; `pattern` matches exactly those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True, slots=True)
class AnswerStyle:
    """One way of answering: a name, its recognisable opening, and the traits a simulated user may rate."""

    name: str
    description: str
    openers: tuple[str, ...]
    polite: bool
    concise: bool
    on_topic: bool

    @property
    def pattern(self) -> re.Pattern[str]:
        """Matches the opening of an answer in this style (leading whitespace allowed)."""
        return _pattern(self.openers)

    def matches(self, text: str) -> bool:
        """True when `text` opens like an answer in this style."""
        return self.pattern.match(text) is not None


@cache
def _pattern(openers: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\s*(?:" + "|".join(re.escape(o) for o in openers) + r")")


ANSWER_STYLES: dict[str, AnswerStyle] = {
    s.name: s
    for s in (
        AnswerStyle(
            name="concise_polite",
            description='Short, friendly and on topic: "Sure! <answer>", or a polite greeting or thanks.',
            openers=("Sure!", "Hello!", "Hi there!", "You're welcome!"),
            polite=True, concise=True, on_topic=True,
        ),
        AnswerStyle(
            name="rambling",
            description='Friendly but long-winded: "Well, ..." or "Oh, so, ...", filler around the answer.',
            openers=("Well,", "Oh, so,"),
            polite=True, concise=False, on_topic=True,
        ),
        AnswerStyle(
            name="curt",
            description='Correct but rude: "Ugh.", "Obviously." or "Whatever." then the answer and a jab.',
            openers=("Ugh.", "Obviously.", "Whatever."),
            polite=False, concise=True, on_topic=True,
        ),
        AnswerStyle(
            name="off_topic",
            description='Ignores the question: "By the way, ...", "Speaking of which, ..." and unrelated trivia.',
            openers=("By the way,", "Speaking of which,", "That reminds me,"),
            polite=True, concise=False, on_topic=False,
        ),
    )
}


def classify_style(text: str) -> str | None:
    """Name of the style whose opener starts `text`, or None when it opens like none of them."""
    for style in ANSWER_STYLES.values():
        if style.matches(text):
            return style.name
    return None
