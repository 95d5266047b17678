"""Shadow routing: replay a sample of served requests to a candidate arm after the client has its answer.

    replayer = ShadowReplayer(settings.shadow, router, publish, guard_output, registry)
    service.add_observer(replayer)      # called once per finished request, after its last chunk
    await replayer.start(); ...; await replayer.aclose()

The observer only decides and enqueues (a hash of the request id against the policy's sample rate, a
bounded queue, `put_nowait`): the request path never waits on a shadow. Workers, `max_concurrency` per
policy, send the request as the engine saw it (after the input guardrails) to the shadow route (the
model's canary arm, or another configured model) without fallbacks, pass the answer through the
request's output policy (what is stored is redacted like every answer), and publish it as an
`InferenceEvent` flagged `shadow`, its `shadow_of` the served inference's id, on the served model name
with the shadow's version: the pairwise grader pairs it with the served answer like any two versions'
answers to one question. A shadow answer is never returned to anyone. A full queue drops the replay
and counts it (`servoloop_shadow_dropped`); a failed or slow shadow costs that replay only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.request import InferenceRequest, Usage
from gateway.router import ModelRoute, Router
from gateway.service import Outcome
from gateway.settings import ShadowPolicy
from schemas.events import Event, InferenceEvent, new_event_id

log = logging.getLogger(__name__)

SHADOW_ARM = "shadow"
_SCALE = 1 << 64


def sampled(request_id: str, rate: float) -> bool:
    """Whether `request_id` falls in the replayed share `rate` (a stable hash: same answer in every gateway)."""
    if rate <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big")
    return h < rate * _SCALE


@dataclass(frozen=True, slots=True)
class Replay:
    """One served request waiting for its shadow: what was served, and the route chosen to replay it."""

    served: InferenceEvent
    request: InferenceRequest
    route: ModelRoute
    version: str
    output_check: Callable[[str], tuple[str, str]] | None  # text -> (stored text, output action)


def served_event(o: Outcome) -> InferenceEvent:
    """The served inference's identity as the shadow event copies it (the fields shared with outcome_events)."""
    from gateway.events import outcome_events

    return outcome_events(o)[0]  # type: ignore[return-value]


class ShadowReplayer:
    """The finish observer and the workers of every shadow policy of one gateway."""

    def __init__(self, policies: Sequence[ShadowPolicy], router: Router, publish: Callable[[Event], None], *,
                 registry: CollectorRegistry | None = None):
        self.policies = list(policies)
        self.router = router
        self._publish = publish
        self._queues: list[asyncio.Queue[Replay]] = [asyncio.Queue(p.queue_size) for p in self.policies]
        self._tasks: list[asyncio.Task[None]] = []
        r = registry if registry is not None else CollectorRegistry()
        self.queued = Gauge("servoloop_shadow_queue_depth", "Shadow replays waiting", ["model", "target"], registry=r)
        self.dropped = Counter("servoloop_shadow_dropped", "Shadow replays dropped because the queue was full",
                               ["model", "target"], registry=r)
        self.replays = Counter("servoloop_shadow_requests", "Shadow replays by result (ok, error)",
                               ["model", "target", "result"], registry=r)
        self.latency = Histogram("servoloop_shadow_latency_seconds", "Time of one shadow replay", ["model", "target"],
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    # --- on the request path: decide and enqueue ------------------------------------------------------------

    def _target(self, policy: ShadowPolicy, o: Outcome) -> tuple[ModelRoute, str] | None:
        adm = o.admission
        if policy.target != "canary":
            route = self.router.primary(policy.target)
            return route, policy.version or f"{policy.target}:{route.version}"
        own = self.router.tenant_arms(policy.model, adm.principal.tenant)
        canary = own.canary if own is not None else self.router.arms(policy.model).canary
        if canary is None or adm.model_version == canary.version:  # no canary live, or the canary served it
            return None
        return canary, policy.version or canary.version

    def __call__(self, o: Outcome) -> None:
        adm = o.admission
        req = adm.request
        if o.status != "ok" or adm.cached is not None:
            return
        for policy, queue in zip(self.policies, self._queues, strict=True):
            if req.model != policy.model or (policy.tenants and adm.principal.tenant not in policy.tenants) \
                    or not sampled(req.request_id, policy.sample_rate):
                continue
            target = self._target(policy, o)
            if target is None:
                continue
            route, version = target
            guard = adm.guard
            check = None
            if guard is not None:
                def check(text: str, policy_=guard.policy, canary=guard.canary) -> tuple[str, str]:
                    v = policy_.check_output(text, system_prompt_canary=canary)
                    return ("" if v.blocked else v.text if v.action == "redact" else text), v.action
            replay = Replay(served_event(o), dataclasses.replace(req, stream=False, deadline=None), route,
                            version, check)
            try:
                queue.put_nowait(replay)
            except asyncio.QueueFull:
                self.dropped.labels(policy.model, policy.target).inc()
                continue
            self.queued.labels(policy.model, policy.target).set(queue.qsize())

    # --- off the request path: replay and record --------------------------------------------------------------

    async def start(self) -> None:
        for policy, queue in zip(self.policies, self._queues, strict=True):
            self._tasks += [asyncio.create_task(self._work(policy, queue), name=f"shadow-{policy.model}-{i}")
                            for i in range(policy.max_concurrency)]

    async def _work(self, policy: ShadowPolicy, queue: asyncio.Queue[Replay]) -> None:
        while True:
            replay = await queue.get()
            self.queued.labels(policy.model, policy.target).set(queue.qsize())
            try:
                await self._replay(policy, replay)
            except Exception:  # one failed replay never stops the worker
                log.exception("shadow replay of %s failed", replay.served.event_id)
            finally:
                queue.task_done()

    async def _replay(self, policy: ShadowPolicy, r: Replay) -> None:
        route, served = r.route, r.served
        request = dataclasses.replace(r.request, request_id=new_event_id(), received_at=time.monotonic())
        self.router.hold(route)  # the adapter stays loaded until the replay ends
        started = time.monotonic()
        status, code, text, finish, usage, action = "ok", "", "", "", None, "allow"
        try:
            async with asyncio.timeout(policy.timeout_s):
                chunk = await route.engine.generate(request, adapter=route.adapter)
            text, finish, usage = chunk.text, chunk.finish_reason or "stop", chunk.usage
            if r.output_check is not None:
                text, action = r.output_check(text)
                if action == "block":
                    finish = "content_filter"
        except Exception as e:  # the shadow's failure is recorded, never raised
            status, code = "error", getattr(e, "code", "timeout" if isinstance(e, TimeoutError) else "internal_error")
        finally:
            self.router.release(route)
        elapsed = time.monotonic() - started
        self.latency.labels(policy.model, policy.target).observe(elapsed)
        self.replays.labels(policy.model, policy.target, status).inc()
        self._publish(shadow_event(served, request.request_id, r.version, route, text=text, status=status, code=code,
                                   finish=finish, usage=usage, elapsed_s=elapsed, output_action=action))

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued replay finished (tests, shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(q.join() for q in self._queues))

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Finish queued replays for up to `timeout_s`, then stop the workers."""
        await self.drain(timeout_s)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


def shadow_event(served: InferenceEvent, event_id: str, version: str, route: ModelRoute, *, text: str, status: str,
                 code: str, finish: str, usage: Usage | None, elapsed_s: float, output_action: str) -> InferenceEvent:
    """The shadow answer as an inference: the served request's identity and inputs, the shadow's version and answer."""
    return msgspec.structs.replace(
        served, event_id=event_id, request_id=event_id, ts_ms=time.time_ns() // 1_000_000, span_id="",
        model_version=version, adapter=route.adapter or "", engine=route.engine.kind, canary_arm=SHADOW_ARM,
        response=text, status=status, error_code=code, finish_reason=finish,
        tokens_in=usage.prompt_tokens if usage else 0, tokens_out=usage.completion_tokens if usage else 0,
        ttft_ms=0.0, latency_ms=elapsed_s * 1000.0, cache_hit=False, stream=False, output_action=output_action,
        cost_usd=0.0, shadow=True, shadow_of=served.event_id)
