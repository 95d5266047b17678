"""Prometheus metrics of one gateway, in its own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("servoloop_requests", "Inference requests served, by outcome",
                                ["model", "tenant", "api", "status"], registry=r)
        self.errors = Counter("servoloop_request_errors", "Inference requests refused or failed, by error code",
                              ["model", "tenant", "code"], registry=r)
        self.latency = Histogram("servoloop_request_latency_seconds", "Time from request to last token",
                                 ["model", "tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("servoloop_time_to_first_token_seconds", "Time from request to first token",
                              ["model", "tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("servoloop_tokens", "Tokens processed", ["model", "tenant", "direction"], registry=r)
        self.cache = Counter("servoloop_cache_lookups", "Response cache lookups", ["result"], registry=r)
        self.active_streams = Gauge("servoloop_active_streams", "Streams open now", registry=r)
        self.guardrails = Counter("servoloop_guardrail_verdicts", "Guardrail verdicts by side and action",
                                  ["side", "action"], registry=r)
        self.feedback = Counter("servoloop_feedback", "Feedback submissions by outcome (accepted, replayed, error code)",
                                ["tenant", "outcome"], registry=r)
        self.fallbacks = Counter("servoloop_engine_fallbacks", "Requests moved to a fallback model",
                                 ["model", "fallback"], registry=r)
        self.model_swaps = Counter("servoloop_model_swaps", "Hot swaps of a model's routing, by outcome (ok, failed, "
                                   "artifact_mismatch)", ["model", "outcome"], registry=r)
        self.model_swap_latency = Histogram("servoloop_model_swap_seconds", "From a model event's arrival to the "
                                            "routing switch (fetch, verify, load, warm)", ["model"],
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.model_version = Gauge("servoloop_model_version_info", "The version each arm of a model serves (1)",
                                   ["model", "arm", "version"], registry=r)
