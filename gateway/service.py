"""The one core request path both front ends call: admit, route, stream, account.

`admit` does every check that can refuse a request (scope, model, sizes, rate limits, cache) before a
front end commits to a response; `run` streams the answer and does the bookkeeping once, whatever
way the stream ends (finished, failed, cancelled by the client, past its deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.auth import Principal
from gateway.budgets import BudgetKeeper, PriceTable
from gateway.cache import CachedAnswer, ResponseCache, cache_key
from gateway.canary import sticky_key
from gateway.engines import collect
from gateway.guarding import GuardState, RequestGuard
from gateway.limits import RateLimiter
from gateway.metrics import GatewayMetrics
from gateway.pins import split_pinned
from gateway.request import Chunk, Completion, InferenceRequest, Usage
from gateway.router import ModelRoute, Router, Served
from gateway.settings import RequestLimits
from gateway.tracing import assign_trace, sample_bound
from schemas.errors import DeadlineExceeded, PromptTooLong, ServoloopError
from schemas.events import new_event_id

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Admission:
    """A request that passed every check and holds its rate-limit reservation."""

    principal: Principal
    request: InferenceRequest
    route: ModelRoute
    api: str
    prompt_tokens: int
    reserved_tokens: int
    cache_key: str | None
    cached: CachedAnswer | None
    guard: GuardState | None = None
    served: list[Served] = field(default_factory=list)
    admitted_at: float = 0.0  # clock() when admitted: the engine call starts here (for the trace)
    sampled: bool = False  # this request's spans are recorded and exported

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def model_version(self) -> str:
        if self.cached is not None:
            return self.cached.model_version
        return self.served[-1].version if self.served else self.route.version

    @property
    def arm(self) -> str:
        """The canary-split arm that answered (`active` or `canary`)."""
        return self.served[-1].arm if self.served else self.route.arm


@dataclass(slots=True)
class Outcome:
    """How a request ended; handed to the observers (metrics here, events and traces elsewhere)."""

    admission: Admission
    text: str
    finish_reason: str | None
    usage: Usage
    status: str  # ok | error | cancelled
    error_code: str
    ttft_s: float | None
    latency_s: float
    cost_usd: float = 0.0  # usage x the price table (0 for a cache hit): recorded and added to budgets


Observer = Callable[[Outcome], None]
RefusalObserver = Callable[[Principal, InferenceRequest, ServoloopError], None]


class InferenceService:
    def __init__(
        self,
        router: Router,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
        limits: RequestLimits,
        *,
        cache: ResponseCache | None = None,
        guard: RequestGuard | None = None,
        observers: list[Observer] | None = None,
        refusal_observers: list[RefusalObserver] | None = None,
        clock: Callable[[], float] = time.monotonic,
        trace_sample_ratio: float | None = None,
        prices: PriceTable | None = None,
        budgets: BudgetKeeper | None = None,
    ):
        self.router = router
        self._limiter = limiter
        self._metrics = metrics
        self._limits = limits
        self._cache = cache
        self._guard = guard
        self._observers = observers or []
        self._refusal_observers = refusal_observers or []
        self._clock = clock
        self._trace_bound = None if trace_sample_ratio is None else sample_bound(trace_sample_ratio)
        self.prices = prices or PriceTable()
        self.budgets = budgets  # spend budgets: checked at admission, fed by an observer (gateway/budgets.py)

    def add_observer(self, observer: Observer, *, refused: RefusalObserver | None = None) -> None:
        """Call `observer` with every admitted request's outcome, and `refused` with every refusal after auth."""
        self._observers.append(observer)
        if refused is not None:
            self._refusal_observers.append(refused)

    def admit(self, principal: Principal, request: InferenceRequest, *, api: str) -> Admission:
        """Check everything that can refuse the request; raises a ServoloopError, takes nothing if so."""
        sampled = assign_trace(request, self._trace_bound)  # before the guard, whose redaction copies the request
        try:
            principal.require("infer")
            if self.budgets is not None:
                self.budgets.check(principal)
            # The route (version, adapter, arm) is chosen once: the request keeps it through any hot swap.
            name, pinned = split_pinned(request.model, self.router.names())
            if pinned is not None:  # `model@version`: that version or a clear error naming its successor
                route = self.router.pinned(name, pinned, principal.tenant)
                request = dataclasses.replace(request, model=name)
            else:
                route = self.router.select(request.model, sticky_key(session=request.session, user=request.user,
                                                                     key_id=principal.key_id), principal.tenant)
            guard_state = None
            if self._guard is not None:
                request, guard_state = self._guard.check_input(principal.tenant, request)
                self._metrics.guardrails.labels("input", guard_state.input.action).inc()
            prompt_tokens = route.engine.count_prompt_tokens(request)
            if prompt_tokens > self._limits.max_prompt_tokens:
                raise PromptTooLong(f"the prompt has {prompt_tokens} tokens; at most {self._limits.max_prompt_tokens} "
                                    "are allowed", param="messages" if request.operation == "chat" else "prompt")
            cache = self._cache
            key = cache_key(request, principal.tenant, route.version) if cache is not None and (request.use_cache or principal.cache) else None
            cached = cache.get(key) if key and cache is not None else None
            if key:
                self._metrics.cache.labels("hit" if cached else "miss").inc()
            now = self._clock()
            budget = prompt_tokens + (0 if cached else request.params.max_tokens)
            reserved = self._limiter.admit(principal.key_id, principal.limits, budget, now)
        except ServoloopError as e:
            self._metrics.errors.labels(request.model, principal.tenant, e.code).inc()
            if e.code == "guardrail_blocked":
                self._metrics.guardrails.labels("input", "block").inc()
            if self._refusal_observers:
                request.request_id = request.request_id or new_event_id()
                for refused in self._refusal_observers:
                    try:
                        refused(principal, request, e)
                    except Exception:  # an observer must never change how a request is answered
                        log.exception("refusal observer failed")
            raise
        request.request_id = request.request_id or new_event_id()
        self.router.hold(route)  # released in _finish: an old adapter is unloaded only after it drained
        return Admission(principal, request, route, api, prompt_tokens, reserved, key, cached, guard_state,
                         admitted_at=now, sampled=sampled)

    async def complete(self, adm: Admission) -> Completion:
        """The whole answer for a unary call."""
        if adm.request.stream:
            final = await collect(self.run(adm))
        else:
            final = await self._unary(adm)
        return Completion(
            id=adm.id, model=adm.request.model, text=final.text, finish_reason=final.finish_reason or "stop",  # type: ignore[arg-type]
            usage=final.usage or Usage(adm.prompt_tokens, 0), created=int(time.time()),
            cached=adm.cached is not None, model_version=adm.model_version,
        )

    async def _unary(self, adm: Admission) -> Chunk:
        start = adm.request.received_at
        try:
            if adm.cached is not None:
                c = adm.cached
                final = Chunk(c.text, c.finish_reason, Usage(adm.prompt_tokens, 0))  # type: ignore[arg-type]
            else:
                async with asyncio.timeout(adm.request.time_left()):
                    final = await self.router.generate(adm.request, adm.served, adm.route)
                if adm.guard is not None:
                    final = RequestGuard.check_output(adm.guard, final)
        except TimeoutError:
            self._finish(adm, "", None, None, "error", DeadlineExceeded.code, None, start)
            raise DeadlineExceeded("the request's deadline passed before the answer was complete") from None
        except asyncio.CancelledError:
            self._finish(adm, "", None, None, "cancelled", "cancelled", None, start)
            raise
        except ServoloopError as e:
            self._finish(adm, "", None, None, "error", e.code, None, start)
            raise
        elapsed = self._clock() - start
        self._finish(adm, final.text, final.finish_reason, final.usage, "ok", "", elapsed, start)
        return final

    async def run(self, adm: Admission) -> AsyncIterator[Chunk]:
        """Stream the answer. Closing this iterator early cancels the generation in the engine."""
        req = adm.request
        start = req.received_at
        parts: list[str] = []
        final: Chunk | None = None
        ttft: float | None = None
        status, code = "ok", ""
        slot = (self._limiter.stream_slot(adm.principal.key_id, adm.principal.limits, self._clock())
                if req.stream else contextlib.nullcontext())
        try:
            with slot:
                self._metrics.active_streams.inc()
                try:
                    if adm.cached is not None:
                        c = adm.cached
                        ttft = self._clock() - start
                        parts.append(c.text)
                        final = Chunk("", c.finish_reason, Usage(adm.prompt_tokens, 0))  # type: ignore[arg-type]
                        yield Chunk(c.text)
                        yield final
                        return
                    source = self.router.stream(req, adm.served, adm.route)
                    if adm.guard is not None:
                        source = RequestGuard.guard_stream(adm.guard, source)
                    async with asyncio.timeout(req.time_left()):
                        async for chunk in source:
                            if ttft is None and chunk.text:
                                ttft = self._clock() - start
                            parts.append(chunk.text)
                            if chunk.finish_reason:
                                final = chunk
                            yield chunk
                finally:
                    self._metrics.active_streams.dec()
        except TimeoutError:
            status, code = "error", DeadlineExceeded.code
            raise DeadlineExceeded("the request's deadline passed before the answer was complete") from None
        except (asyncio.CancelledError, GeneratorExit):
            status, code = "cancelled", "cancelled"
            raise
        except ServoloopError as e:
            status, code = "error", e.code
            raise
        except Exception:
            status, code = "error", "internal_error"
            raise
        finally:
            if final is None and status == "ok":  # the consumer stopped reading without cancelling
                status, code = "cancelled", "cancelled"
            self._finish(adm, "".join(parts), final.finish_reason if final else None,
                         final.usage if final else None, status, code, ttft, start)

    def _finish(self, adm: Admission, text: str, finish_reason: str | None, usage: Usage | None, status: str,
                code: str, ttft: float | None, start: float) -> None:
        """Account for a finished request exactly once: tokens, metrics, cache, observers."""
        now = self._clock()
        self.router.release(adm.route)
        usage = usage or Usage(adm.prompt_tokens, 0)
        p, model, tenant = adm.principal, adm.request.model, adm.principal.tenant
        self._limiter.settle(p.key_id, adm.reserved_tokens, usage.total_tokens if adm.cached is None else 0, now)
        m = self._metrics
        m.requests.labels(model, tenant, adm.api, status).inc()
        if adm.guard is not None and adm.guard.output is not None:
            m.guardrails.labels("output", adm.guard.output.action).inc()
        if status != "ok":
            m.errors.labels(model, tenant, code).inc()
        else:
            m.latency.labels(model, tenant).observe(now - start)
            if ttft is not None:
                m.ttft.labels(model, tenant).observe(ttft)
            m.tokens.labels(model, tenant, "in").inc(usage.prompt_tokens)
            m.tokens.labels(model, tenant, "out").inc(usage.completion_tokens)
            if adm.cache_key and adm.cached is None and self._cache is not None:
                self._cache.put(adm.cache_key, CachedAnswer(text, finish_reason or "stop", usage, adm.model_version, now))
        cost = 0.0 if adm.cached is not None else self.prices.cost(model, usage.prompt_tokens, usage.completion_tokens)
        outcome = Outcome(adm, text, finish_reason, usage, status, code, ttft, now - start, cost)
        for observe in self._observers:
            try:
                observe(outcome)
            except Exception:  # an observer must never fail a request
                log.exception("request observer failed")
