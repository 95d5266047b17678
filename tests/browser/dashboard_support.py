"""Seeded dashboard data and a real gateway serving the admin extension, for the API and browser tests."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from feedback.dashboard import admin_extension
from feedback.store import ChdbStore, Store, migrate, write_events
from gateway.auth import KeyStore
from gateway.engines.remote import RemoteEngine
from gateway.server import Gateway, GatewayServer
from gateway.settings import GatewaySettings, ModelSettings, RateLimitSettings
from schemas.events import (
    Event,
    GuardrailEvent,
    InferenceEvent,
    ModelEvent,
    MonitorResult,
    RetrainTrigger,
)
from tests.support.clickhouse_http import shared_chdb_session
from tests.support.openai_upstream import RunningUpstream

HOUR = 3_600_000
MINUTE = 60_000
PRICES = {"chat": (0.5, 1.5)}  # per 1k tokens in, out
QUALITY_V1 = [(0.80, 0.74, 0.86), (0.75, 0.69, 0.81), (0.50, 0.43, 0.57)]  # thumbs_up_rate (value, ci_low, ci_high)
LATENCIES_MS = [10.0 * i for i in range(1, 21)]  # 10 .. 200


@dataclass
class Seeded:
    """What was written, and where: tests compare the API and the page with these."""

    base_ms: int  # the start of the seeded hour (every event lies in [base_ms, base_ms + 1h))
    report_dir: Path
    trigger: RetrainTrigger
    quality_ts: list[int] = field(default_factory=list)  # window ends of the v1 thumbs_up_rate points


async def new_store() -> Store:
    """A migrated, empty database of its own on the process's chDB session."""
    store = ChdbStore(shared_chdb_session(), f"t_{uuid.uuid4().hex[:12]}")
    await migrate(store)
    return store


async def seed_dashboard(store: Store, report_dir: Path) -> Seeded:
    """One hour of data for model `chat` (versions v1 active, v2 canary caused by a trigger), ending ~now."""
    now = time.time_ns() // 1_000_000
    base = now - now % HOUR - HOUR  # the last full hour: one latency/guardrail bucket at step=1h
    events: list[Event] = []
    for i, latency in enumerate(LATENCIES_MS):
        events.append(InferenceEvent(tenant="acme", ts_ms=base + i * MINUTE, model="chat",
                                     model_version="v1" if i % 2 else "v2", tokens_in=10, tokens_out=5,
                                     latency_ms=latency, ttft_ms=latency / 2, status="error" if i == 0 else "ok"))
    findings: list[tuple[dict[str, int], str]] = ([({"pii_email": 1}, "redact")] * 4 + [({"prompt_injection": 2}, "block")] * 2
                                                  + [({}, "allow")] * 4)
    for i, (counts, action) in enumerate(findings):
        events.append(GuardrailEvent(tenant="acme", ts_ms=base + i * MINUTE, model="chat", side="input",
                                     action=action, finding_counts=counts))  # type: ignore[arg-type]
    # monitor results as feedback/monitors/runner.py publishes them: `monitor` is the policy entry's name
    quality_ts = []
    for i, (value, low, high) in enumerate(QUALITY_V1):
        end = base + (i + 1) * 15 * MINUTE
        quality_ts.append(end)
        events.append(MonitorResult(tenant="acme", ts_ms=end + 1000, monitor="satisfaction_drop",
                                    metric="thumbs_up_rate", model="chat", model_version="v1",
                                    window_start_ms=end - 15 * MINUTE, window_end_ms=end, value=value, threshold=0.05,
                                    sample_size=200, status="alert" if value < 0.7 else "ok",
                                    details=json.dumps({"monitor_kind": "quality", "ci_low": low, "ci_high": high,
                                                        "p_value": 0.001})))
    for end, value, n, status, ci in [(base + 15 * MINUTE, 4.2, 50, "ok", [3.9, 4.5]),
                                      (base + 30 * MINUTE, 0.0, 0, "insufficient_data", None)]:  # no ratings: no value
        events.append(MonitorResult(tenant="acme", ts_ms=end, monitor="rating_drop", metric="mean_rating",
                                    model="chat", model_version="v1", window_start_ms=end - 15 * MINUTE,
                                    window_end_ms=end, value=value, sample_size=n, status=status,  # type: ignore[arg-type]
                                    details=json.dumps({"monitor_kind": "quality", "ci": ci})))
    # drift: the dataset flag with its per-column scores (warn when drifted), embedding drift (here with too
    # few samples: no score); the run's report as an absolute path
    report_dir.mkdir(parents=True, exist_ok=True)
    report = report_dir / "drift-chat-v1-run1.html"
    report.write_text("<html><body><h1>drift report run1</h1></body></html>")
    (report_dir.parent / "secret.html").write_text("not a report")

    def column(score: float, drifted: bool) -> dict[str, object]:
        return {"score": score, "threshold": 0.1, "method": "wasserstein", "drifted": drifted}

    for ts, monitor, metric, score, status, extra in [
        (base + 5 * MINUTE, "request_drift", "dataset_drift", 0.9, "alert",  # superseded below
         {"column_scores": {"prompt_length": column(0.9, True)}, "drifted": ["prompt_length"]}),
        (base + 40 * MINUTE, "request_drift", "dataset_drift", 0.5, "alert",
         {"column_scores": {"prompt_length": column(0.31, True), "tokens_in": column(0.02, False)},
          "drifted": ["prompt_length"]}),
        (base + 40 * MINUTE, "prompt_drift", "prompt_embedding_drift", 0.0, "insufficient_data", {"min_samples": 100}),
    ]:
        events.append(MonitorResult(tenant="acme", ts_ms=ts, monitor=monitor, metric=metric, model="chat",
                                    model_version="v1", window_start_ms=ts - HOUR, window_end_ms=ts, value=score,
                                    threshold=0.5, status=status, sample_size=1000,  # type: ignore[arg-type]
                                    details=json.dumps({"monitor_kind": "drift", "report": str(report), **extra})))
    trigger = RetrainTrigger(tenant="acme", ts_ms=base + 46 * MINUTE, model="chat", model_version="v1",
                             method="dpo", reason="thumbs_up_rate fell 0.80 -> 0.50 (p=0.001)",
                             window_start_ms=base, window_end_ms=base + 45 * MINUTE)
    events.append(trigger)
    for version, state, previous, ts, lineage in [
        ("v1", "candidate", "", base - 3 * HOUR, {}),
        ("v1", "canary", "candidate", base - 2 * HOUR, {}),
        ("v1", "active", "canary", base - HOUR, {}),
        ("v2", "candidate", "", base + 50 * MINUTE, {"trigger_id": trigger.event_id}),
        ("v2", "canary", "candidate", base + 55 * MINUTE, {"trigger_id": trigger.event_id}),
    ]:
        events.append(ModelEvent(model="chat", version_id=version, state=state, previous_state=previous, ts_ms=ts,
                                 base_model="tiny-chat", adapter_path=f"/adapters/{version}", actor="registry",
                                 reason=f"{state} by the loop", lineage=json.dumps(lineage)))
    await write_events(store, events)
    return Seeded(base_ms=base, report_dir=report_dir, trigger=trigger, quality_ts=quality_ts)


@dataclass
class AdminGateway:
    server: GatewayServer
    keystore: KeyStore
    published: list[Event]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def key(self, tenant: str = "ops", scopes: tuple[str, ...] = ("admin",)) -> tuple[str, str]:
        """(key id, key) of a fresh key the gateway accepts at once."""
        key_id, key = self.keystore.create(tenant, scopes)
        self.server.gw.auth.reload()
        return key_id, key


@asynccontextmanager
async def admin_gateway(store: Store, keystore: KeyStore, *, report_dir: Path | None,
                        read_only: bool = False, extensions: tuple[Any, ...] = ()) -> AsyncIterator[AdminGateway]:
    """A real gateway (one remote model on a local upstream) with the admin extension, as `servoloop up` wires it."""
    upstream = await RunningUpstream().start()
    models = [ModelSettings(name="chat", engine="remote", url=upstream.url)]
    engines = {m.name: RemoteEngine(m) for m in models}
    for e in engines.values():
        await e.start()
    published: list[Event] = []
    settings = GatewaySettings(models=models, rate_limits=RateLimitSettings(
        requests_per_minute=0, tokens_per_minute=0, max_concurrent_streams=0))
    gw = Gateway(settings, keystore, engines=engines, events=SimpleNamespace(publish=published.append))
    gw.http_extensions.append(admin_extension(
        store, gw.auth.authenticate, publish=None if read_only else published.append,
        health=lambda: {"broker": "none", "sink": "ok"}, report_dir=report_dir, prices=PRICES, refresh_s=2))
    for extension in extensions:  # more routes, e.g. the release API: called with (store, authenticate)
        gw.http_extensions.append(extension(store, gw.auth.authenticate))
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    try:
        yield AdminGateway(server, keystore, published)
    finally:
        await server.stop()
        for e in engines.values():
            await e.aclose()
        await upstream.stop()
