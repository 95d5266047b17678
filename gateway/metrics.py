"""Prometheus metrics of one gateway, in its own registry (no process-global state)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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

    def watch_adapters(self, engines: Mapping[str, Any]) -> None:
        """Export the adapter caches of `engines` (model name -> engine; those without one are skipped).

        Idempotent per registry: a second gateway on the same metrics adds its engines to the one collector."""
        collector = getattr(self, "_adapter_collector", None)
        if collector is None:
            collector = self._adapter_collector = AdapterCacheCollector({})
            self.registry.register(collector)
        collector.engines.update(engines)


class AdapterCacheCollector(Collector):
    """Adapters loaded, cache hits and misses, loads, evictions and load time of each engine, read at scrape."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self.engines: dict[str, Any] = dict(engines)

    def collect(self) -> Iterator[Metric]:
        loaded = GaugeMetricFamily("servoloop_adapters_loaded", "LoRA adapters loaded in the engine now", labels=["model"])
        registered = GaugeMetricFamily("servoloop_adapters_registered", "LoRA adapters the engine can serve",
                                       labels=["model"])
        lookups = CounterMetricFamily("servoloop_adapter_cache_lookups", "Requests naming an adapter, by whether it "
                                      "was loaded (hit) or had to load first (miss)", labels=["model", "result"])
        loads = CounterMetricFamily("servoloop_adapter_loads", "Adapter loads into the engine", labels=["model"])
        evictions = CounterMetricFamily("servoloop_adapter_evictions", "Adapters evicted (least recently used)",
                                        labels=["model"])
        seconds = CounterMetricFamily("servoloop_adapter_load_seconds", "Time spent loading adapters",
                                      labels=["model"])
        for name, engine in list(self.engines.items()):
            cache = getattr(engine, "adapter_cache", None)
            if cache is None:
                continue
            st = cache.stats()
            loaded.add_metric([name], st.loaded)
            registered.add_metric([name], st.registered)
            lookups.add_metric([name, "hit"], st.hits)
            lookups.add_metric([name, "miss"], st.misses)
            loads.add_metric([name], st.loads)
            evictions.add_metric([name], st.evictions)
            seconds.add_metric([name], st.load_seconds)
        yield from (loaded, registered, lookups, loads, evictions, seconds)
