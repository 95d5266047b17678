"""Exact-match response cache: same model, parameters and input at temperature 0 → same answer."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from gateway.request import InferenceRequest, Usage


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    text: str
    finish_reason: str
    usage: Usage
    model_version: str
    stored_at: float


def cache_key(request: InferenceRequest, tenant: str, version: str = "") -> str | None:
    """The cache key, or None when the request is not cacheable (sampling is not deterministic).

    Keys include the tenant: one tenant's cached answers are never served to another; and the model version
    the request was routed to: after a hot swap (or on the other canary arm) an old version's answer is a miss.
    """
    if request.params.temperature != 0:
        return None
    p = request.params
    material = msgspec.msgpack.encode(
        [tenant, request.model, version, request.operation, p.max_tokens, p.top_p, list(p.stop), p.seed, p.min_tokens,
         [[m.role, m.content] for m in request.messages], request.prompt]
    )
    return hashlib.blake2b(material, digest_size=20).hexdigest()


class ResponseCache:
    """A bounded LRU with a time-to-live. Not shared between replicas."""

    def __init__(self, max_entries: int, ttl_s: float):
        self._max = max_entries
        self._ttl = ttl_s
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float | None = None) -> CachedAnswer | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if (now or time.monotonic()) - hit.stored_at > self._ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return hit

    def put(self, key: str, answer: CachedAnswer) -> None:
        self._entries[key] = answer
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (a model version changed)."""
        self._entries.clear()
