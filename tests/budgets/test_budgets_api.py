"""Budgets over the admin API and the CLI (`servoloop budgets set|show`), end to end into a running gateway, and
the dashboard's per-tenant reads: an operator's key sees every tenant, another tenant's admin key only its own."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from typer.testing import CliRunner

from feedback.store import Store, write_events
from schemas.errors import ServoloopError
from schemas.events import BudgetAlert, BudgetEvent, InferenceEvent, ModelEvent, MonitorResult, period_bounds
from servoloop.cli import app
from tests.budgets.conftest import CHAT, MakeGateway
from tests.gateway.conftest import RunningGateway

HOUR = 3_600_000


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _post_chat(gw: RunningGateway, key: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{gw.http}/v1/chat/completions", json=CHAT, headers=_auth(key))


async def _ingest(gw: RunningGateway, store: Store) -> None:
    """What the ingester does with everything the gateway and its admin API published so far."""
    await write_events(store, gw.events)
    gw.events.clear()


async def _cli(*args: str) -> tuple[int, str]:
    """Exit code and output; a ServoloopError (exit 2 with its message under `servoloop`) as code 2 and its text."""
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    if isinstance(result.exception, ServoloopError):
        return 2, f"error ({result.exception.code}): {result.exception.message}"
    return result.exit_code, result.output


async def test_budgets_set_with_the_cli_reach_the_gateway_and_show_their_spend(make_gateway: MakeGateway,
                                                                               store: Store) -> None:
    gw = await make_gateway()
    _, admin = gw.keystore.create("ops", ["admin"])
    key = gw.key("cli-co")
    gw.gw.auth.reload()

    code, out = await _cli("budgets", "set", "--tenant", "cli-co", "--period", "day", "--soft", "4", "--hard", "9",
                           "--reason", "trial tier", "--url", gw.http, "--admin-key", admin)
    assert code == 0, out
    assert "set the daily budget of tenant cli-co: soft 4, hard 9" in out
    [budget] = [e for e in gw.events if isinstance(e, BudgetEvent)]
    assert (budget.scope, budget.subject, budget.tenant, budget.period, budget.soft_usd, budget.hard_usd,
            budget.reason) == ("tenant", "cli-co", "cli-co", "day", 4.0, 9.0, "trial tier")
    await _ingest(gw, store)
    assert gw.gw.budgets is not None
    await gw.gw.budgets.refresh()  # the gateway's next poll

    assert [(await _post_chat(gw, key)).status_code for _ in range(3)] == [200, 200, 429]  # 5, 10 >= 9: refused
    await _ingest(gw, store)
    code, out = await _cli("budgets", "show", "--tenant", "cli-co", "--json", "--url", gw.http, "--admin-key", admin)
    assert code == 0, out
    [row] = json.loads(out)["budgets"]
    assert (row["spend_usd"], row["state"], row["reset_ms"]) == (10.0, "hard", period_bounds("day", time.time())[1])
    code, out = await _cli("budgets", "show", "--url", gw.http, "--admin-key", admin)
    assert code == 0 and "cli-co" in out and "hard" in out

    # cleared: both limits 0; the next poll lets the tenant through again
    code, out = await _cli("budgets", "set", "--tenant", "cli-co", "--url", gw.http, "--admin-key", admin)
    assert code == 0 and "cleared" in out
    await _ingest(gw, store)
    await gw.gw.budgets.refresh()
    assert (await _post_chat(gw, key)).status_code == 200


async def test_budget_cli_and_api_refuse_bad_input_and_non_operators(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(budgets=False)
    _, admin = gw.keystore.create("ops", ["admin"])
    _, tenant_admin = gw.keystore.create("acme", ["admin"])
    gw.gw.auth.reload()
    code, out = await _cli("budgets", "set", "--soft", "1", "--url", gw.http, "--admin-key", admin)
    assert code == 2 and "--tenant" in out
    code, out = await _cli("budgets", "set", "--tenant", "a", "--soft", "5", "--hard", "2", "--url", gw.http,
                           "--admin-key", admin)
    assert code == 2 and "must not exceed" in out
    code, out = await _cli("budgets", "show", "--url", gw.http, "--admin-key", "")
    assert code == 2 and "(invalid_api_key): an admin key is needed" in out
    code, out = await _cli("budgets", "show", "--url", "http://127.0.0.1:9", "--admin-key", admin)
    assert code == 2 and "cannot reach the admin API" in out
    async with httpx.AsyncClient(base_url=gw.http) as c:
        for body, param in [({"scope": "team", "subject": "a"}, "scope"), ({"subject": "a", "period": "week"}, "period"),
                            ({"subject": "a", "hard_usd": -1}, "hard_usd"), ({"period": "day"}, "subject"),
                            ({"subject": "a", "soft_usd": 3, "hard_usd": 2}, "soft_usd"),
                            ({"subject": "a", "colour": "red"}, "body")]:
            r = await c.post("/admin/v1/budgets", json=body, headers=_auth(admin))
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), body
        r = await c.post("/admin/v1/budgets", json={"subject": "acme", "hard_usd": 1e6}, headers=_auth(tenant_admin))
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
        r = await c.get("/admin/v1/budgets", params={"tenant": "other"}, headers=_auth(tenant_admin))
        assert r.status_code == 403
        r = await c.get("/admin/v1/budgets", headers=_auth(gw.key("acme")))  # no admin scope at all
        assert r.status_code == 403
    assert [e for e in gw.events if isinstance(e, BudgetEvent)] == []


async def test_a_tenant_admin_key_reads_only_its_own_tenant_and_an_operator_picks_any(make_gateway: MakeGateway,
                                                                                      store: Store) -> None:
    gw = await make_gateway(budgets=False)
    now = time.time_ns() // 1_000_000
    marker = "MARKER-beta-only"
    await write_events(store, [
        InferenceEvent(tenant="alpha", ts_ms=now - 60_000, model="remote", tokens_in=10, cost_usd=1.5),
        InferenceEvent(tenant="beta", ts_ms=now - 60_000, model="remote", tokens_in=20, cost_usd=7.0),
        MonitorResult(tenant="alpha", ts_ms=now - 30_000, monitor="sat", metric="thumbs_up_rate", model="remote",
                      window_start_ms=now - HOUR, window_end_ms=now - 30_000, value=0.9, sample_size=50),
        MonitorResult(tenant="beta", ts_ms=now - 30_000, monitor="sat", metric="thumbs_up_rate", model="remote",
                      window_start_ms=now - HOUR, window_end_ms=now - 30_000, value=0.2, sample_size=50),
        ModelEvent(tenant="beta", model="remote", version_id="beta-v1", state="candidate", reason=marker),
        ModelEvent(tenant="", model="remote", version_id="global-v1", state="active"),
        BudgetEvent(scope="tenant", subject="beta", tenant="beta", period="month", soft_usd=5, hard_usd=50),
        BudgetAlert(tenant="beta", scope="tenant", subject="beta", period="month", level="soft", spend_usd=7.0,
                    limit_usd=5.0, period_start_ms=period_bounds("month", now / 1000)[0]),
    ])
    _, ops = gw.keystore.create("ops", ["admin"])
    _, alpha = gw.keystore.create("alpha", ["admin"])
    gw.gw.auth.reload()
    async with httpx.AsyncClient(base_url=gw.http, timeout=60) as c:
        async def get(path: str, key: str, **params: str) -> dict:
            r = await c.get(path, params=params, headers=_auth(key))
            assert r.status_code == 200, r.text
            return r.json()

        assert (await get("/admin/v1/tenants", ops))["tenants"] == ["alpha", "beta"]
        assert (await get("/admin/v1/tenants", alpha))["tenants"] == ["alpha"]

        spend = await get("/admin/v1/spend", ops, since="2h")
        assert {s["tenant"]: s["total_usd"] for s in spend["series"]} == {"alpha": 1.5, "beta": 7.0}
        assert [(b["subject"], b["spend_usd"], b["state"]) for b in spend["budgets"]] == [("beta", 7.0, "soft")]
        assert [a["level"] for a in spend["alerts"]] == ["soft"]
        beta = await get("/admin/v1/spend", ops, since="2h", tenant="beta")
        assert [s["tenant"] for s in beta["series"]] == ["beta"]

        mine = await get("/admin/v1/spend", alpha, since="2h")
        assert [s["tenant"] for s in mine["series"]] == ["alpha"] and mine["budgets"] == mine["alerts"] == []
        quality = await get("/admin/v1/metrics", alpha, since="2h")
        assert [(s["tenant"], s["points"][0]["value"]) for s in quality["series"]] == [("alpha", 0.9)]
        assert [(s["tenant"], s["points"][0]["value"]) for s in
                (await get("/admin/v1/metrics", ops, since="2h", tenant="beta"))["series"]] == [("beta", 0.2)]
        timeline = await get("/admin/v1/models", alpha)
        assert [v["version_id"] for m in timeline["models"] for v in m["versions"]] == ["global-v1"]
        for path in ("/admin/v1/models", "/admin/v1/overview", "/admin/v1/latency", "/admin/v1/drift", "/admin/v1/spend",
                     "/admin/v1/alerts", "/admin/v1/triggers", "/admin/v1/guardrails", "/admin/v1/canary",
                     "/admin/v1/budgets", "/admin/v1/tenants"):
            r = await c.get(path, headers=_auth(alpha))
            assert r.status_code == 200 and marker not in r.text and "beta" not in r.text, path
            r = await c.get(path, params={"tenant": "beta"}, headers=_auth(alpha))
            assert r.status_code in (403, 400) and marker not in r.text, path
        r = await c.post("/admin/v1/models/remote/versions/beta-v1/rollback", headers=_auth(alpha))
        assert r.status_code == 404



def test_budgets_cli_help_names_both_commands_and_their_limits() -> None:
    result = CliRunner().invoke(app, ["budgets", "--help"])
    assert result.exit_code == 0 and "set" in result.output and "show" in result.output
    result = CliRunner().invoke(app, ["budgets", "set", "--help"])
    assert result.exit_code == 0
    for option in ("--tenant", "--key", "--period", "--soft", "--hard", "--admin-key", "--url"):
        assert option in result.output, option
