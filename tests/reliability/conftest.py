"""A whole serving surface for fuzzing and isolation tests: the tiny model on the Transformers engine, the
Feedback API, the admin API and the registry's routes on a real chDB store, as `servoloop up` wires them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from feedback.dashboard import admin_extension
from feedback.dashboard.models_api import models_extension
from feedback.store import Store
from gateway.auth import KeyStore
from gateway.engines import Engine
from gateway.server import Gateway, GatewayServer
from gateway.settings import GatewaySettings, ModelSettings, RateLimitSettings, RequestLimits
from schemas.events import Event
from tests.browser.dashboard_support import new_store

# Generation is kept short so a thousand fuzzed requests fit the suite's time budget: larger max_tokens
# values are refused with a 400 (which is itself a path the fuzzer must see answered cleanly).
LIMITS = RequestLimits(max_output_tokens=4, default_max_tokens=2, max_prompt_tokens=256)


@dataclass
class FullGateway:
    server: GatewayServer
    keystore: KeyStore
    store: Store
    published: list[Event] = field(default_factory=list)

    @property
    def gw(self) -> Gateway:
        return self.server.gw

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def key(self, tenant: str = "acme", scopes: tuple[str, ...] = ("infer", "feedback")) -> str:
        _, key = self.keystore.create(tenant, scopes)
        self.gw.auth.reload()
        return key


@pytest.fixture(scope="session")
async def full_gateway(keystore: KeyStore, tiny_model_dir: object,
                       transformers_engine: Engine) -> AsyncIterator[FullGateway]:
    store = await new_store()
    published: list[Event] = []
    settings = GatewaySettings(
        models=[ModelSettings(name="tiny", path=str(tiny_model_dir))], limits=LIMITS,
        rate_limits=RateLimitSettings(requests_per_minute=0, tokens_per_minute=0, max_concurrent_streams=0))
    gw = Gateway(settings, keystore, engines={"tiny": transformers_engine},
                 events=SimpleNamespace(publish=published.append))
    gw.http_extensions.append(admin_extension(store, gw.auth.authenticate, publish=published.append,
                                              health=lambda: {"broker": "none", "sink": "ok"}, report_dir=None))
    gw.http_extensions.append(models_extension(store, gw.auth.authenticate, publish=published.append))
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    try:
        yield FullGateway(server, keystore, store, published)
    finally:
        await server.stop()
        await store.query(f"DROP DATABASE IF EXISTS {store.database}")
