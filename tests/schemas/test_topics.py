"""Topic names: one per event type under a configurable prefix, plus the dead-letter topic."""

from __future__ import annotations

import pytest

from schemas import topics
from schemas.errors import ConfigError
from schemas.events import EVENT_TYPES, DeadLetter, InferenceEvent


def test_every_event_type_publishes_to_a_known_topic_and_the_dead_letter_topic_is_its_own() -> None:
    assert {t.topic for t in EVENT_TYPES} == set(topics.ALL_SUFFIXES)
    assert DeadLetter.topic == topics.DEAD_LETTER
    assert topics.dead_letter_topic() == "servoloop.dead-letter"


def test_the_prefix_is_configurable_and_applies_to_every_topic() -> None:
    assert topics.topic_name(InferenceEvent.topic) == "servoloop.inferences"
    assert topics.topic_name(InferenceEvent.topic, "staging.") == "staging.inferences"
    assert all(t.startswith("t1.") for t in topics.all_topics("t1."))
    assert len(set(topics.all_topics())) == len(topics.ALL_SUFFIXES)


@pytest.mark.parametrize("prefix", ["bad prefix.", "a/b.", "x" * 240, "ünï."])
def test_a_prefix_that_would_make_an_illegal_kafka_topic_is_a_config_error(prefix: str) -> None:
    with pytest.raises(ConfigError):
        topics.topic_name(InferenceEvent.topic, prefix)
