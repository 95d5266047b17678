"""Spend and budgets (issue 10, acceptance 4): spend = tokens x price on every inference; a soft limit raises
exactly one alert per period; a hard limit refuses with `budget_exceeded` and the reset time over HTTP and
gRPC; budgets and spend hold across a gateway restart and follow the store while running."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest

from feedback.budgets import alert_rows, budget_rows, spend_since
from feedback.store import Store, write_events
from gateway.auth import KeyStore
from gateway.budgets import PriceTable, current_budgets, iso_ms, period_bounds
from gateway.engines import Engine
from gateway.server import Gateway, GatewayServer
from gateway.settings import ModelSettings
from schemas.events import BudgetAlert, BudgetEvent, Event, InferenceEvent
from schemas.pb import inference_pb2 as pb
from tests.budgets.conftest import CHAT, COST, MakeGateway
from tests.gateway.conftest import RunningGateway, settings_for

DAY_S = 86_400


async def _post(gw: RunningGateway, key: str, body: dict = CHAT) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{gw.http}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


async def _grpc_generate(gw: RunningGateway, key: str) -> pb.GenerateResponse:
    async with grpc.aio.insecure_channel(gw.grpc) as ch:
        call = ch.unary_unary("/servoloop.v1.Inference/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateResponse.FromString)
        req = pb.GenerateRequest(model="remote", messages=[pb.ChatMessage(role="user", content="hi")],
                                 params=pb.SamplingParams(max_tokens=4))
        return await call(req, metadata=(("authorization", f"Bearer {key}"),))


def _alerts(gw: RunningGateway, level: str = "soft") -> list[BudgetAlert]:
    return [e for e in gw.events if isinstance(e, BudgetAlert) and e.level == level]


def _inferences(gw: RunningGateway) -> list[InferenceEvent]:
    return [e for e in gw.events if isinstance(e, InferenceEvent)]


# -- pure parts -------------------------------------------------------------------------------------------


def test_periods_are_utc_days_and_months_and_december_rolls_into_january() -> None:
    t = dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    assert [iso_ms(ms) for ms in period_bounds("day", t)] == ["2026-12-31T00:00:00Z", "2027-01-01T00:00:00Z"]
    assert [iso_ms(ms) for ms in period_bounds("month", t)] == ["2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"]
    feb = dt.datetime(2028, 2, 29, 12, tzinfo=dt.UTC).timestamp()
    assert [iso_ms(ms) for ms in period_bounds("month", feb)] == ["2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"]


def test_price_table_charges_per_thousand_tokens_with_a_fallback_and_nothing_for_unpriced_models() -> None:
    prices = PriceTable({"big": (3.0, 15.0), "*": (1.0, 1.0)})
    assert prices.cost("big", 1000, 2000) == pytest.approx(33.0)
    assert prices.cost("other", 500, 500) == pytest.approx(1.0)
    assert PriceTable({"big": (3.0, 15.0)}).cost("other", 500, 500) == 0.0


def test_the_latest_budget_row_is_in_force_and_zero_limits_clear_it() -> None:
    rows = [BudgetEvent(ts_ms=1, scope="tenant", subject="a", period="day", soft_usd=1, hard_usd=2),
            BudgetEvent(ts_ms=2, scope="tenant", subject="a", period="day", soft_usd=5, hard_usd=9),
            BudgetEvent(ts_ms=1, scope="tenant", subject="a", period="month", hard_usd=100),
            BudgetEvent(ts_ms=1, scope="key", subject="k1", period="day", hard_usd=3),
            BudgetEvent(ts_ms=2, scope="key", subject="k1", period="day")]
    now = current_budgets(rows)
    assert sorted(now) == [("tenant", "a", "day"), ("tenant", "a", "month")]
    assert (now[("tenant", "a", "day")].soft_usd, now[("tenant", "a", "day")].hard_usd) == (5, 9)


# -- spend on real gateways --------------------------------------------------------------------------------


async def test_spend_recorded_with_each_inference_is_tokens_times_price(make_gateway: MakeGateway, store: Store) -> None:
    gw = await make_gateway()
    key = gw.key("spend-co")
    assert (await _post(gw, key)).status_code == 200
    await _grpc_generate(gw, key)
    streamed = await _post(gw, key, {**CHAT, "stream": True, "max_tokens": 3})
    assert streamed.status_code == 200

    got = _inferences(gw)
    assert [(e.tokens_in, e.tokens_out) for e in got] == [(5, 4), (5, 4), (5, 3)]
    assert [e.cost_usd for e in got] == pytest.approx([e.tokens_in * 0.2 + e.tokens_out * 1.0 for e in got])
    assert gw.gw.budgets is not None
    assert gw.gw.budgets.spend("tenant", "spend-co", "day") == pytest.approx(COST * 2 + 4.0)

    await write_events(store, gw.events)  # what the ingester does: the store sums the same spend
    day, month = period_bounds("day", time.time())[0], period_bounds("month", time.time())[0]
    [row] = await spend_since(store, day, month, tenant="spend-co")
    assert (row.day_usd, row.month_usd) == (pytest.approx(14.0), pytest.approx(14.0))


async def test_spend_on_the_real_tiny_model_matches_its_token_counts(keystore: KeyStore, tiny_model_dir: Path,
                                                                      transformers_engine: Engine) -> None:
    events: list[Event] = []
    settings = settings_for([ModelSettings(name="tiny", path=str(tiny_model_dir))])
    server = GatewayServer(Gateway(settings, keystore, engines={"tiny": transformers_engine},
                                   events=SimpleNamespace(publish=events.append), prices=PriceTable({"tiny": (0.5, 1.5)})),
                           host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    try:
        gw = RunningGateway(server, keystore, events=events)
        r = await _post(gw, gw.key("tiny-co"), {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
                                                "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200
    finally:
        await server.stop()
    [e] = _inferences(gw)
    usage = r.json()["usage"]
    assert (e.tokens_in, e.tokens_out) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert e.tokens_in > 0 and e.tokens_out > 0
    assert e.cost_usd == pytest.approx(e.tokens_in * 0.0005 + e.tokens_out * 0.0015)


# -- soft and hard limits ----------------------------------------------------------------------------------


async def test_soft_limit_emits_exactly_one_alert_per_period_and_again_in_the_next(make_gateway: MakeGateway,
                                                                                   store: Store) -> None:
    await write_events(store, [BudgetEvent(scope="tenant", subject="soft-co", period="day", soft_usd=8.0)])
    now = [time.time()]
    gw = await make_gateway(clock=lambda: now[0])
    key = gw.key("soft-co")

    assert (await _post(gw, key)).status_code == 200  # 5.0: under the soft limit
    assert _alerts(gw) == []
    for _ in range(3):  # 10.0, 15.0, 20.0: over it, still one alert (no hard limit: all served)
        assert (await _post(gw, key)).status_code == 200
    [alert] = _alerts(gw)
    start, reset = period_bounds("day", now[0])
    assert (alert.tenant, alert.scope, alert.subject, alert.period) == ("soft-co", "tenant", "soft-co", "day")
    assert (alert.spend_usd, alert.limit_usd) == (pytest.approx(10.0), 8.0)
    assert (alert.period_start_ms, alert.reset_ms) == (start, reset)

    now[0] += DAY_S  # the next UTC day: spend starts from 0, and crossing again alerts again
    assert (await _post(gw, key)).status_code == 200
    assert len(_alerts(gw)) == 1
    assert (await _post(gw, key)).status_code == 200
    first, second = _alerts(gw)
    assert second.period_start_ms == first.reset_ms and second.event_id != first.event_id

    await write_events(store, gw.events)
    assert [a.event_id for a in await alert_rows(store, 0, tenant="soft-co")] == [second.event_id, first.event_id]


async def test_hard_limit_refuses_with_budget_exceeded_and_the_reset_time_over_http_and_grpc(
        make_gateway: MakeGateway, store: Store) -> None:
    await write_events(store, [BudgetEvent(scope="tenant", subject="hard-co", period="day", soft_usd=4, hard_usd=14)])
    gw = await make_gateway()
    key = gw.key("hard-co")
    assert [(await _post(gw, key)).status_code for _ in range(3)] == [200, 200, 200]  # 5, 10, 15: the 3rd passed 14

    refused = await _post(gw, key)
    _, reset = period_bounds("day", time.time())
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "rate_limit_error"
    assert error["details"]["reset_at"] == iso_ms(reset)
    assert error["details"]["period"] == "day" and error["details"]["scope"] == "tenant"
    assert error["details"]["spend_usd"] == pytest.approx(15.0)
    assert iso_ms(reset) in error["message"]
    assert abs(int(refused.headers["retry-after"]) - (reset / 1000 - time.time())) <= 2

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _grpc_generate(gw, key)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(e.value.trailing_metadata())
    assert trailers["servoloop-error-code"] == "budget_exceeded"
    assert trailers["servoloop-reset-at"] == iso_ms(reset)
    assert abs(int(trailers["retry-after"]) - (reset / 1000 - time.time())) <= 2

    other = gw.key("other-co")  # another tenant is not affected
    assert (await _post(gw, other)).status_code == 200
    assert len(_inferences(gw)) == 4  # refused requests cost nothing and reach no engine
    assert [a.level for a in gw.events if isinstance(a, BudgetAlert)] == ["soft", "hard"]


async def test_a_key_budget_refuses_only_that_key(make_gateway: MakeGateway, store: Store) -> None:
    gw = await make_gateway(poll_interval_s=0.1)
    spender, sibling = gw.key("keys-co"), gw.key("keys-co")
    key_id = spender.split("-")[1]
    await write_events(store, [BudgetEvent(scope="key", subject=key_id, period="month", hard_usd=5)])
    assert gw.gw.budgets is not None
    await gw.gw.budgets.refresh()  # what the poll does every poll_interval_s
    assert (await _post(gw, spender)).status_code == 200
    refused = await _post(gw, spender)
    assert refused.status_code == 429 and refused.json()["error"]["details"]["period"] == "month"
    assert refused.json()["error"]["details"]["reset_at"] == iso_ms(period_bounds("month", time.time())[1])
    assert (await _post(gw, sibling)).status_code == 200


# -- persistence and several gateways ----------------------------------------------------------------------


async def test_budgets_and_spend_survive_a_gateway_restart(make_gateway: MakeGateway, store: Store) -> None:
    await write_events(store, [BudgetEvent(scope="tenant", subject="restart-co", period="day", soft_usd=8,
                                           hard_usd=12)])
    first = await make_gateway()
    key = first.key("restart-co")
    assert [(await _post(first, key)).status_code for _ in range(3)] == [200, 200, 200]  # 15 spent
    assert (await _post(first, key)).status_code == 429
    await first.server.stop()
    await write_events(store, first.events)  # the ingester's work: inferences (with cost) and the alerts

    second = await make_gateway()  # a fresh process: nothing in memory, everything from the store
    assert second.gw.budgets is not None
    assert second.gw.budgets.spend("tenant", "restart-co", "day") == pytest.approx(15.0)
    refused = await _post(second, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert [e for e in second.events if isinstance(e, BudgetAlert)] == []  # already raised this period


async def test_spend_of_other_gateways_and_new_budgets_arrive_by_polling_the_store(make_gateway: MakeGateway,
                                                                                   store: Store) -> None:
    gw = await make_gateway(poll_interval_s=0.1)
    key = gw.key("fleet-co")
    assert (await _post(gw, key)).status_code == 200  # 5.0 here
    assert gw.gw.budgets is not None
    # another gateway served 20.0 for the tenant (already ingested); then a budget of 22 is set
    await write_events(store, [InferenceEvent(tenant="fleet-co", key_id="elsewhere", model="remote", cost_usd=20.0),
                               BudgetEvent(scope="tenant", subject="fleet-co", period="day", hard_usd=22)])
    refs = gw.gw.budgets.state.refreshes
    while gw.gw.budgets.state.refreshes < refs + 2:
        await _sleep()
    assert gw.gw.budgets.spend("tenant", "fleet-co", "day") == pytest.approx(25.0)
    assert (await _post(gw, key)).status_code == 429

    # this gateway's own request reaches the store: counted once, not twice
    await write_events(store, _inferences(gw))
    refs = gw.gw.budgets.state.refreshes
    while gw.gw.budgets.state.refreshes < refs + 2:
        await _sleep()
    assert gw.gw.budgets.spend("tenant", "fleet-co", "day") == pytest.approx(25.0)

    # the budget is raised: the next poll lets the tenant through again
    await write_events(store, [BudgetEvent(scope="tenant", subject="fleet-co", period="day", hard_usd=100)])
    refs = gw.gw.budgets.state.refreshes
    while gw.gw.budgets.state.refreshes < refs + 2:
        await _sleep()
    assert (await _post(gw, key)).status_code == 200
    assert [b.hard_usd for b in await budget_rows(store)] == [22, 100]


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.05)
