"""Kafka topic names: one topic per event type plus a dead-letter topic, all under one configurable prefix.

Event classes carry only the suffix (`InferenceEvent.topic == "inferences"`); the full name is
`prefix + suffix`, so several deployments can share one cluster (`staging.inferences`, ...).
"""

from __future__ import annotations

import re

from schemas.errors import ConfigError

DEFAULT_PREFIX = "servoloop."

INFERENCES = "inferences"
GUARDRAILS = "guardrails"
FEEDBACK = "feedback"
MODELS = "models"
MONITORS = "monitors"
RETRAIN = "retrain"
DEAD_LETTER = "dead-letter"
GRADES = "grades"
BUDGETS = "budgets"
BUDGET_ALERTS = "budget-alerts"

ALL_SUFFIXES: tuple[str, ...] = (INFERENCES, GUARDRAILS, FEEDBACK, MODELS, MONITORS, RETRAIN, DEAD_LETTER, GRADES,
                                   BUDGETS, BUDGET_ALERTS)

# Kafka's legal topic alphabet and length limit (kafka.common.internals.Topic).
_LEGAL = re.compile(r"^[A-Za-z0-9._-]*$")
_MAX_TOPIC_LEN = 249


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if every topic built from it is a legal Kafka name; raise ConfigError otherwise."""
    if not _LEGAL.match(prefix):
        raise ConfigError(f"topic prefix {prefix!r} may only hold letters, digits, '.', '_' and '-'")
    if len(prefix) + max(map(len, ALL_SUFFIXES)) > _MAX_TOPIC_LEN:
        raise ConfigError(f"topic prefix {prefix!r} is too long (topics are at most {_MAX_TOPIC_LEN} characters)")
    return prefix


def topic_name(suffix: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The full topic for an event type's `topic` suffix, e.g. `topic_name(InferenceEvent.topic)`."""
    return validate_prefix(prefix) + suffix


def dead_letter_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """Where undecodable or rejected records go, with the reason, for inspection and replay."""
    return topic_name(DEAD_LETTER, prefix)


def all_topics(prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """Every topic servoloop produces to or consumes from (what an operator pre-creates)."""
    return tuple(topic_name(s, prefix) for s in ALL_SUFFIXES)
