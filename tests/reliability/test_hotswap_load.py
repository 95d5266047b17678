"""Hot swap under load, repeatedly: clients keep calling (unary and streaming, HTTP) while the registry's rows
promote an adapter, roll it back, promote the other one, and so on; no request fails and each swap is served."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from feedback.broker import EmbeddedBroker
from tests.feedback.conftest import broker  # noqa: F401
from tests.gateway.conftest import RunningGateway
from tests.gateway.hotswap_support import Adapter, lora_adapters, model_event, publish  # noqa: F401
from tests.gateway.test_hotswap import swap_gateway, until_version  # noqa: F401

pytestmark = pytest.mark.reliability

ROUNDS = 3  # promote + rollback per round: 6 swaps


async def test_repeated_promote_and_rollback_under_load_fail_no_request(
        swap_gateway: tuple[RunningGateway, str], broker: EmbeddedBroker,  # noqa: F811
        lora_adapters: dict[str, Adapter]):  # noqa: F811
    gw, prefix = swap_gateway
    key = gw.key()
    stop = asyncio.Event()
    outcomes: list[tuple[int, str]] = []
    versions: set[str] = set()

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=gw.http, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as c:
            n = 0
            while not stop.is_set():
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"hello {i} {n}"}],
                        "max_tokens": 4, "temperature": 0, "stream": bool(n % 2)}
                try:
                    r = await c.post("/v1/chat/completions", json=body)
                    outcomes.append((r.status_code, "" if r.status_code == 200 else r.text[:200]))
                    versions.add(r.headers.get("x-servoloop-model-version", "?"))
                except httpx.HTTPError as e:
                    outcomes.append((0, repr(e)))
                n += 1

    clients = [asyncio.create_task(client(i)) for i in range(4)]
    swaps: list[float] = []
    try:
        await asyncio.sleep(1.0)
        for r in range(ROUNDS):
            adapter = ("v1", "v2")[r % 2]
            t0 = time.monotonic()
            await publish(broker.bootstrap_servers, prefix, [model_event(
                "tiny", f"{adapter}r{r}", "active", lora_adapters[adapter], previous="candidate")])
            await until_version(gw, key, f"{adapter}r{r}", timeout_s=30)
            swaps.append(time.monotonic() - t0)
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            await publish(broker.bootstrap_servers, prefix, [
                model_event("tiny", f"{adapter}r{r}", "rolled_back", lora_adapters[adapter], previous="active"),
                model_event("tiny", f"base{r}", "active", previous="retired")])
            await until_version(gw, key, f"base{r}", timeout_s=30)
            swaps.append(time.monotonic() - t0)
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    failed = [o for o in outcomes if o[0] != 200]
    print(json.dumps({"requests": len(outcomes), "failed": len(failed), "swaps": len(swaps),
                      "swap_s_max": round(max(swaps), 2), "versions": sorted(versions)}))
    assert not failed, failed[:5]
    assert len(swaps) == 2 * ROUNDS and len(outcomes) > 20
    assert {"v1r0", f"base{ROUNDS - 1}"} <= versions
