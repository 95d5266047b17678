"""Many adapters in one engine: registered adapters load on first use, the least recently used is evicted
beyond the bound and loads again on its next request with the same answers, concurrent requests of many adapters
each get their own adapter's answer, and the gateway's Prometheus metrics report it. Real engines, real PEFT
adapters on the bundled tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gateway.engines import Engine
from gateway.engines.adapters import AdapterCache
from gateway.metrics import GatewayMetrics
from gateway.request import ChatMessage, InferenceRequest, SamplingParams
from schemas.errors import NotFound
from tests.conftest import tiny_settings

N = 4


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`N` PEFT LoRA adapters with different random non-zero weights (one per tenant)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i in range(N):
        torch.manual_seed(100 + i)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
        d = tmp_path_factory.mktemp(f"tenant-{i}")
        peft.save_pretrained(d)
        out[f"tenant-{i}"] = str(d)
    return out


@pytest.fixture(scope="module")
async def small_cache_engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    """A Transformers engine that keeps at most 2 adapters loaded."""
    from gateway.engines.transformers import TransformersEngine

    engine = TransformersEngine(tiny_settings(tiny_model_dir, engine="transformers", max_loaded_adapters=2))
    await engine.start()
    yield engine
    await engine.aclose()


def _request(content: str = "How do I reset my password?") -> InferenceRequest:
    return InferenceRequest(model="tiny", operation="chat", params=SamplingParams(max_tokens=8, temperature=0.0),
                            messages=(ChatMessage("user", content),))


async def test_adapters_load_on_first_use_and_the_least_recently_used_is_evicted_and_reloaded(
        small_cache_engine: Engine, adapters: dict[str, str]) -> None:
    engine = small_cache_engine
    cache: AdapterCache = engine.adapter_cache  # type: ignore[attr-defined]
    for name, path in adapters.items():
        await engine.register_adapter(name, path)  # type: ignore[attr-defined]
    assert cache.loaded() == [] and len(cache.registered_paths()) == N
    metrics = GatewayMetrics()
    metrics.watch_adapters({"tiny": engine})

    base = (await engine.generate(_request())).text
    first = {name: (await engine.generate(_request(), adapter=name)).text for name in adapters}
    assert cache.loaded() == ["tenant-2", "tenant-3"]  # bound 2: the least recently used went out
    st = cache.stats()
    assert (st.misses, st.hits, st.loads, st.evictions) == (N, 0, N, N - 2)
    assert any(text != base for text in first.values())
    assert len(set(first.values())) > 1  # different tenants, different adapters, different answers

    again = (await engine.generate(_request(), adapter="tenant-0")).text  # evicted: loads again on this request
    assert again == first["tenant-0"]
    assert cache.loaded() == ["tenant-3", "tenant-0"] and cache.stats().loads == N + 1
    assert (await engine.generate(_request(), adapter="tenant-0")).text == again and cache.stats().hits == 1

    # concurrent requests of every tenant, interleaved: each answer is its own adapter's
    names = [f"tenant-{i % N}" for i in range(2 * N)]
    answers = await asyncio.gather(*(engine.generate(_request(), adapter=n) for n in names))
    assert [a.text for a in answers] == [first[n] for n in names]

    text = generate_latest(metrics.registry).decode()
    st = cache.stats()
    assert 2 <= st.loaded <= N  # in-use adapters may hold it over the bound for a while; never evicted under a request
    assert f'servoloop_adapters_loaded{{model="tiny"}} {float(st.loaded)}' in text
    assert f'servoloop_adapters_registered{{model="tiny"}} {float(N)}' in text
    assert f'servoloop_adapter_cache_lookups_total{{model="tiny",result="miss"}} {float(st.misses)}' in text
    assert f'servoloop_adapter_loads_total{{model="tiny"}} {float(st.loads)}' in text
    assert st.load_seconds > 0 and "servoloop_adapter_load_seconds_total" in text

    for name in adapters:
        await engine.unload_adapter(name)
    assert cache.loaded() == [] and not cache.registered_paths()
    with pytest.raises(NotFound):
        await engine.generate(_request(), adapter="tenant-0")


async def test_the_vllm_engine_batches_many_adapters_and_loads_each_once(
        vllm_engine: Engine, transformers_engine: Engine, adapters: dict[str, str]) -> None:
    cache: AdapterCache = vllm_engine.adapter_cache  # type: ignore[attr-defined]
    loads = cache.stats().loads
    for name, path in adapters.items():
        await vllm_engine.register_adapter(name, path)  # type: ignore[attr-defined]
    try:
        names = [f"tenant-{i % N}" for i in range(3 * N)]
        answers = await asyncio.gather(*(vllm_engine.generate(_request(), adapter=n) for n in names))
        assert cache.stats().loads == loads + N  # first use loads each once, however many requests wait for it
        for name in adapters:  # the same greedy answers as one request at a time, and as PEFT gives
            alone = (await vllm_engine.generate(_request(), adapter=name)).text
            assert {a.text for a, n in zip(answers, names, strict=True) if n == name} == {alone}
        assert len({a.text for a in answers}) > 1
    finally:
        for name in adapters:
            await vllm_engine.unload_adapter(name)


async def test_one_load_serves_every_waiting_request_and_an_adapter_in_use_is_not_evicted() -> None:
    loaded: list[str] = []
    evicted: list[str] = []
    gate = asyncio.Event()

    async def load(name: str, path: str) -> None:
        await gate.wait()
        loaded.append(name)

    async def evict(name: str) -> None:
        evicted.append(name)

    cache = AdapterCache(1, load, evict)
    for n in ("a", "b"):
        cache.register(n, f"/adapters/{n}")

    async def use(name: str, hold: asyncio.Event | None = None) -> None:
        async with cache.use(name):
            if hold is not None:
                await hold.wait()

    waiting = [asyncio.create_task(use("a")) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*waiting)
    assert loaded == ["a"] and cache.misses == 5
    hold = asyncio.Event()
    holder = asyncio.create_task(use("a", hold))
    await asyncio.sleep(0)
    await use("b")  # bound 1, but "a" is in use: it stays, over the bound until it is free
    assert evicted == [] and set(cache.loaded()) == {"a", "b"}
    hold.set()
    await holder
    await use("a")
    assert cache.loaded()[-1] == "a"
    with pytest.raises(NotFound):
        await cache.unregister("zzz")
