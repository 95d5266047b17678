"""`servoloop budgets set|show`: spend budgets per tenant or per key, per UTC day or month.

A budget has a soft limit (one `BudgetAlert` per period, shown in the dashboard) and a hard limit (requests
refused with `budget_exceeded`, HTTP 429 / gRPC RESOURCE_EXHAUSTED, until the period resets). Amounts are
in the unit of the price table (`monitors.prices`, per 1,000 tokens), USD by convention.

Budgets are append-only rows in the store, written through the admin API of the running `servoloop up`
(`--url`, `--admin-key`, or $SERVOLOOP_URL, $SERVOLOOP_ADMIN_KEY; the key needs the admin scope); every
gateway picks a change up at its next poll (`gateway.budgets.poll_interval_s`). Exit 0 on success, 2 on
any error (bad arguments, bad key, unreachable API).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from servoloop.commands.models import DEFAULT_URL, HttpBackend, JsonOpt, UrlOpt

app = typer.Typer(help="Spend budgets per tenant or key: set soft and hard limits per day or month, show spend.",
                  no_args_is_help=True)
console = Console(stderr=True)
ADJECTIVE = {"day": "daily", "month": "monthly"}

AdminKeyOpt = Annotated[str, typer.Option("--admin-key", envvar="SERVOLOOP_ADMIN_KEY",
                                          help="an API key with the admin scope (for the admin API)")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="the tenant the budget is for")]


def _call(url: str, admin_key: str, method: str, path: str, **kw: Any) -> Any:
    backend = HttpBackend(url, admin_key)

    async def go() -> Any:
        try:
            return await backend._call(method, path, **kw)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) + "Z" if ms else "-"


@app.command("set")
def set_(tenant: TenantOpt = None,
         key: Annotated[str | None, typer.Option("--key", help="a key id (the 12 hex after 'sl-'): a budget for "
                                                               "that key alone")] = None,
         period: Annotated[str, typer.Option("--period", help="day or month (UTC)")] = "day",
         soft: Annotated[float, typer.Option("--soft", min=0, help="soft limit: one alert per period (0: none)")] = 0.0,
         hard: Annotated[float, typer.Option("--hard", min=0, help="hard limit: refuse requests until the period "
                                                                    "resets (0: none)")] = 0.0,
         reason: Annotated[str, typer.Option("--reason", help="why (kept with the budget)")] = "",
         url: UrlOpt = DEFAULT_URL, admin_key: AdminKeyOpt = "", as_json: JsonOpt = False) -> None:
    """Set (or, with --soft 0 --hard 0, clear) the budget of a tenant (--tenant) or of one key (--key)."""
    if tenant is None and key is None:  # both: a key budget naming the key's tenant (shown in its dashboard)
        raise typer.BadParameter("name what the budget is for: --tenant T or --key KEY_ID", param_hint="--tenant")
    if period not in ("day", "month"):
        raise typer.BadParameter("must be 'day' or 'month'", param_hint="--period")
    if soft and hard and soft > hard:
        raise typer.BadParameter(f"the soft limit ({soft:g}) must not exceed the hard limit ({hard:g})",
                                 param_hint="--soft")
    if key is not None and key.startswith("sl-"):
        key = key.split("-")[1]  # a whole key was given: only its id is stored, never the secret
    body: dict[str, Any] = {"scope": "key" if key else "tenant", "subject": key or tenant, "period": period,
                            "soft_usd": soft, "hard_usd": hard, "reason": reason}
    if key and tenant:
        body["tenant"] = tenant
    out = _call(url, admin_key, "POST", "/admin/v1/budgets", json=body)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    what = f"{out['scope']} {out['subject']}"
    if not out["soft_usd"] and not out["hard_usd"]:
        console.print(f"cleared the {ADJECTIVE[out['period']]} budget of {what}")
    else:
        console.print(f"set the {ADJECTIVE[out['period']]} budget of {what}: soft {out['soft_usd']:g}, hard {out['hard_usd']:g} "
                      f"(event {out['event_id']}; gateways apply it at their next poll)")


@app.command("show")
def show(tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant's budgets")] = None,
         url: UrlOpt = DEFAULT_URL, admin_key: AdminKeyOpt = "", as_json: JsonOpt = False) -> None:
    """Show the budgets in force with this period's spend, state (ok, soft, hard) and reset time."""
    out = _call(url, admin_key, "GET", "/admin/v1/budgets", params={"tenant": tenant} if tenant else None)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    if not out["budgets"]:
        console.print("no budgets set" + (f" for tenant {tenant}" if tenant else ""))
        return
    table = Table("scope", "subject", "tenant", "period", "spend", "soft", "hard", "state", "resets (UTC)")
    for b in out["budgets"]:
        state = {"hard": "[bold red]hard[/bold red]", "soft": "[yellow]soft[/yellow]"}.get(b["state"], b["state"])
        table.add_row(b["scope"], b["subject"], b["tenant"], b["period"], f"{b['spend_usd']:.4g}",
                      f"{b['soft_usd']:g}" if b["soft_usd"] else "-", f"{b['hard_usd']:g}" if b["hard_usd"] else "-",
                      state, _when(b["reset_ms"]))
    Console().print(table)
