"""The security suite runs on the same whole-surface gateway as the fuzzers."""

from __future__ import annotations

from tests.reliability.conftest import full_gateway  # noqa: F401
