"""`servoloop guard check|eval` and `servoloop redteam`: guardrails from the command line.

`check` prints one verdict as JSON; `eval` scores a policy on a labelled JSONL set; `redteam` sends the
bundled attack set to a live gateway's /v1/chat/completions and reports what got through.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from guardrails import Policy
    from guardrails.redteam import Attack, Result, Summary

app = typer.Typer(help="Guardrails: check a text against a policy, evaluate detectors on a labelled set.",
                  no_args_is_help=True)
console = Console(stderr=True)

PolicyOpt = Annotated[Path | None, typer.Option("--policy", "-p", help="policy YAML (default: the bundled one)")]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="tenant whose policy applies")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="model whose policy applies")]


def _policy(policy: Path | None, tenant: str, model: str) -> Policy:
    from guardrails import default_policy_set, load_policy_set

    return (load_policy_set(policy) if policy else default_policy_set()).resolve(tenant, model)


@app.command()
def check(text: Annotated[str, typer.Argument(help="the text to check; '-' reads stdin")],
          policy: PolicyOpt = None, tenant: TenantOpt = "default", model: ModelOpt = "default",
          side: Annotated[str, typer.Option(help="input (a request) or output (a response)")] = "input",
          canary: Annotated[str | None, typer.Option(help="system-prompt canary, for --side output")] = None) -> None:
    """Print the verdict for TEXT as JSON: action, findings (no sensitive text), redacted text."""
    import msgspec

    if side not in ("input", "output"):
        raise typer.BadParameter("must be input or output", param_hint="--side")
    body = sys.stdin.read() if text == "-" else text
    p = _policy(policy, tenant, model)
    start = time.perf_counter_ns()
    verdict = p.check_input(body) if side == "input" else p.check_output(body, system_prompt_canary=canary)
    elapsed_us = (time.perf_counter_ns() - start) // 1000
    out = {"action": verdict.action, "findings": msgspec.to_builtins(verdict.findings), "text": verdict.text,
           "policy": p.name, "side": side, "elapsed_us": elapsed_us}
    print(json.dumps(out, ensure_ascii=False, indent=2))


@app.command("eval")
def eval_(dataset: Annotated[Path, typer.Argument(help="labelled JSONL (see tests/data/guardrails)", exists=True)],
          policy: PolicyOpt = None, tenant: TenantOpt = "default", model: ModelOpt = "default",
          as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON only")] = False,
          misses: Annotated[int, typer.Option(help="also list up to N misclassified examples")] = 0) -> None:
    """Precision and recall per detector and finding type on DATASET, through the policy's input side."""
    from guardrails.evaluation import evaluate, read_jsonl

    report = evaluate(_policy(policy, tenant, model).input, read_jsonl(dataset), keep_misses=misses)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    print(f"{report.examples} examples from {dataset}\n")
    print(report.markdown())
    for m in report.misses:
        print(f"- {m['id']}: {'; '.join(m['errors'])}")


async def run_redteam(url: str, key: str, model: str | None = None, attacks_path: Path | None = None,
                      concurrency: int = 4, request_timeout_s: float = 60.0, transport: Any = None) -> Summary:
    """Send every attack to `url`'s /v1/chat/completions and judge each answer (`transport`: for tests)."""
    import httpx

    from guardrails.redteam import Summary, judge, load_attacks, new_canary

    attacks = load_attacks(attacks_path)
    headers = {"Authorization": f"Bearer {key}"}
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    summary = Summary()
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=request_timeout_s,
                                 transport=transport) as client:
        if model is None:
            listed = (await client.get("/v1/models")).json()
            model = listed["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)

        async def one(attack: Attack) -> Result:
            rendered = attack.render(new_canary())
            async with gate:
                try:
                    r = await client.post("/v1/chat/completions", json={
                        "model": model, "messages": list(rendered.messages), "max_tokens": 64, "temperature": 0})
                except httpx.HTTPError as e:
                    return judge(rendered, None, f"{type(e).__name__}: {e}")
            try:
                body = r.json()
            except ValueError:
                body = {"raw": r.text[:200]}
            text = ""
            if r.status_code == 200 and isinstance(body, dict):
                text = "".join((c.get("message") or {}).get("content") or "" for c in body.get("choices", []))
            return judge(rendered, r.status_code, body, text)

        summary.results = list(await asyncio.gather(*(one(a) for a in attacks)))
    return summary


def redteam(url: Annotated[str, typer.Option(help="gateway base URL, e.g. http://127.0.0.1:8000")],
            key: Annotated[str, typer.Option(help="API key for the gateway", envvar="SERVOLOOP_API_KEY")],
            model: Annotated[str | None, typer.Option(help="model to attack (default: the first listed)")] = None,
            attacks: Annotated[Path | None, typer.Option(help="attack set JSONL (default: the bundled one)")] = None,
            concurrency: Annotated[int, typer.Option(min=1, max=64)] = 4,
            timeout: Annotated[float, typer.Option(help="seconds per request")] = 60.0,
            as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON only")] = False) -> None:
    """Send the bundled attack set to a live gateway; report what got through (exit 1 if anything did)."""
    summary = asyncio.run(run_redteam(url, key, model, attacks, concurrency, timeout))
    report = summary.as_dict()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['attacks']} attacks against {url}: {report['got_through']} got through\n")
        print("| category | " + " | ".join(("blocked", "held", "got_through", "leaked", "error")) + " |")
        print("|---|---|---|---|---|---|")
        for cat, counts in report["by_category"].items():
            cells = " | ".join(str(counts.get(k, 0)) for k in ("blocked", "held", "got_through", "leaked", "error"))
            print(f"| {cat} | {cells} |")
        for r in report["through"]:
            print(f"- {r['id']} ({r['category']}): {r['outcome']} {r['detail']}")
    if report["got_through"]:
        raise typer.Exit(1)


TOP_LEVEL = {"redteam": redteam}
