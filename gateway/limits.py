"""Per-key rate limits: requests/minute and tokens/minute token buckets, and concurrent streams.

Pure bookkeeping on monotonic time passed in by the caller; limits are per gateway replica.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gateway.settings import RateLimitSettings
from schemas.errors import RateLimited


@dataclass(slots=True)
class TokenBucket:
    """Holds up to `capacity`, refilled continuously at `capacity` per minute."""

    capacity: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, limit: int, now: float) -> TokenBucket:
        return cls(float(limit), float(limit), now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
            self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        self._refill(now)
        deficit = min(amount, self.capacity) - self.level
        return 0.0 if deficit <= 0 else deficit * 60.0 / self.capacity

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= min(amount, self.capacity)

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent_streams: int


@dataclass(slots=True)
class _KeyState:
    limits: KeyLimits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    streams: int = 0


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class RateLimiter:
    def __init__(self, defaults: RateLimitSettings):
        self._defaults = KeyLimits(defaults.requests_per_minute, defaults.tokens_per_minute,
                                   defaults.max_concurrent_streams)
        self._keys: dict[str, _KeyState] = {}

    def limits_for(self, rpm: int | None, tpm: int | None, streams: int | None) -> KeyLimits:
        d = self._defaults
        return KeyLimits(d.requests_per_minute if rpm is None else rpm, d.tokens_per_minute if tpm is None else tpm,
                         d.max_concurrent_streams if streams is None else streams)

    def _state(self, key_id: str, limits: KeyLimits, now: float) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None or st.limits != limits:  # new key, or its limits were changed
            st = _KeyState(
                limits,
                TokenBucket.per_minute(limits.requests_per_minute, now) if limits.requests_per_minute else None,
                TokenBucket.per_minute(limits.tokens_per_minute, now) if limits.tokens_per_minute else None,
                st.streams if st else 0,
            )
            self._keys[key_id] = st
        return st

    def admit(self, key_id: str, limits: KeyLimits, tokens: int, now: float) -> int:
        """Take one request and `tokens` (prompt + max_tokens) from the key's buckets.

        Returns the tokens reserved (settle them with `settle`). Raises RateLimited with the wait
        until a retry can succeed; nothing is taken from any bucket when it raises.
        """
        st = self._state(key_id, limits, now)
        waits = []
        if st.requests is not None and (w := st.requests.wait_for(1, now)) > 0:
            waits.append((w, "requests_per_minute", f"{limits.requests_per_minute} requests per minute"))
        if st.tokens is not None and (w := st.tokens.wait_for(tokens, now)) > 0:
            waits.append((w, "tokens_per_minute", f"{limits.tokens_per_minute} tokens per minute"))
        if waits:
            wait, name, text = max(waits)
            raise RateLimited(f"rate limit of {text} exceeded for this key; retry in {wait:.1f}s",
                              retry_after_s=wait, limit=name)
        if st.requests is not None:
            st.requests.take(1, now)
        reserved = 0
        if st.tokens is not None:
            reserved = int(min(tokens, st.tokens.capacity))
            st.tokens.take(reserved, now)
        return reserved

    def settle(self, key_id: str, reserved: int, used: int, now: float) -> None:
        """Return the unused part of a reservation (or take the overrun) once usage is known."""
        st = self._keys.get(key_id)
        if st is None or st.tokens is None:
            return
        if used < reserved:
            st.tokens.give_back(reserved - used, now)
        elif used > reserved:
            st.tokens.take(used - reserved, now)

    @contextmanager
    def stream_slot(self, key_id: str, limits: KeyLimits, now: float) -> Iterator[None]:
        """Hold one of the key's concurrent stream slots; raises RateLimited when all are taken."""
        st = self._state(key_id, limits, now)
        cap = limits.max_concurrent_streams
        if cap and st.streams >= cap:
            raise RateLimited(f"this key already has {cap} concurrent streams open", retry_after_s=1.0,
                              limit="concurrent_streams")
        st.streams += 1
        try:
            yield
        finally:
            st.streams -= 1
