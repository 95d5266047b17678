"""In-process gateways over real engines: the tiny model on Transformers and on vLLM, and a real
OpenAI-protocol upstream for the remote engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from feedback.store import Store
from gateway.auth import KeyStore
from gateway.engines import Engine
from gateway.engines.remote import RemoteEngine
from gateway.server import Gateway, GatewayServer
from gateway.service import Outcome
from gateway.settings import GatewaySettings, HotSwapSettings, ModelSettings, RateLimitSettings
from schemas.events import Event, ModelEvent
from tests.support.openai_upstream import RunningUpstream, UpstreamBehaviour


@dataclass
class RunningGateway:
    server: GatewayServer
    keystore: KeyStore
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)  # everything the gateway published, in order

    @property
    def gw(self) -> Gateway:
        return self.server.gw

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def key(self, tenant: str = "acme", scopes: Iterable[str] = ("infer", "feedback"), **kw: object) -> str:
        """A fresh key, visible to the gateway at once."""
        _, key = self.keystore.create(tenant, scopes, **kw)  # type: ignore[arg-type]
        self.gw.auth.reload()
        return key


async def start_gateway(settings: GatewaySettings, keystore: KeyStore, engines: dict[str, Engine]) -> RunningGateway:
    events: list[Event] = []
    publisher = SimpleNamespace(publish=events.append)
    server = GatewayServer(Gateway(settings, keystore, engines=engines, events=publisher), host="127.0.0.1",
                           http_port=0, grpc_port=0)
    await server.start()
    running = RunningGateway(server, keystore, events=events)
    server.gw.service.add_observer(running.outcomes.append)
    return running


def settings_for(models: list[ModelSettings], **kw: object) -> GatewaySettings:
    return GatewaySettings(models=models, rate_limits=RateLimitSettings(requests_per_minute=0, tokens_per_minute=0,
                                                                        max_concurrent_streams=0), **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def store_following_gateway(keystore: KeyStore, model_dir: Path, engine: Engine, store: Store,
                                  cache_dir: Path, *, model: str = "tiny", events: object = None,
                                  extend: Callable[[Gateway], None] | None = None) -> AsyncIterator[RunningGateway]:
    """A gateway serving `model` on the shared `engine` that follows the registry's rows in `store` by polling
    (as `servoloop up` wires it), events to `events` when given; `extend` adds HTTP routes before it starts.
    On exit it stops and unloads every adapter it loaded, leaving the shared engine as it was."""
    from servoloop.up import _model_events

    settings = settings_for([ModelSettings(name=model, path=str(model_dir))],
                            hotswap=HotSwapSettings(poll_interval_s=0.1, drain_timeout_s=5.0))
    gw = Gateway(settings, keystore, engines={model: engine}, events=events)

    async def rows() -> list[ModelEvent]:
        return await _model_events(store)

    gw.follow_models(cache_dir=cache_dir, poll=rows)
    if extend is not None:
        extend(gw)
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    try:
        yield RunningGateway(server, keystore)
    finally:
        await server.stop()
        for name in list(getattr(engine, "_adapters", {})):
            await engine.unload_adapter(name)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[RunningUpstream]:
    up = await RunningUpstream(UpstreamBehaviour(tokens=8)).start()
    yield up
    await up.stop()


@pytest.fixture(scope="session")
async def failing_upstream() -> AsyncIterator[RunningUpstream]:
    up = await RunningUpstream(UpstreamBehaviour(fail_status=503)).start()
    yield up
    await up.stop()


@pytest.fixture(scope="session")
async def remote_gateway(keystore: KeyStore, upstream: RunningUpstream,
                         failing_upstream: RunningUpstream) -> AsyncIterator[RunningGateway]:
    """Models: `remote` (a working upstream), `failing` (503s, falls back to remote), `dead` (nothing listens)."""
    models = [
        ModelSettings(name="remote", engine="remote", url=upstream.url),
        ModelSettings(name="failing", engine="remote", url=failing_upstream.url, fallbacks=["remote"]),
        ModelSettings(name="dead", engine="remote", url="http://127.0.0.1:9/v1", fallbacks=["remote"]),
        ModelSettings(name="dead-alone", engine="remote", url="http://127.0.0.1:9/v1"),
    ]
    engines: dict[str, Engine] = {m.name: RemoteEngine(m) for m in models}
    for e in engines.values():
        await e.start()
    running = await start_gateway(settings_for(models), keystore, engines)
    yield running
    await running.server.stop()
    for e in engines.values():
        await e.aclose()


def _local_models(tiny_model_dir: object) -> list[ModelSettings]:
    return [ModelSettings(name="tiny", path=str(tiny_model_dir))]


@pytest.fixture(scope="session")
async def transformers_gateway(keystore: KeyStore, tiny_model_dir: object,
                               transformers_engine: Engine) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(settings_for(_local_models(tiny_model_dir)), keystore, {"tiny": transformers_engine})
    yield running
    await running.server.stop()


@pytest.fixture(scope="session")
async def vllm_gateway(keystore: KeyStore, tiny_model_dir: object, vllm_engine: Engine) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(settings_for(_local_models(tiny_model_dir)), keystore, {"tiny": vllm_engine})
    yield running
    await running.server.stop()


@pytest.fixture(params=["transformers", "vllm"])
def local_gateway(request: pytest.FixtureRequest) -> RunningGateway:
    """The same tests over both local engines serving the real tiny model."""
    return request.getfixturevalue(f"{request.param}_gateway")


# Hot swap: the session's tansu broker (shared with tests/feedback when both run) and real LoRA adapters.
from tests.feedback.conftest import broker  # noqa: E402, F401
from tests.gateway.hotswap_support import lora_adapters  # noqa: E402, F401
