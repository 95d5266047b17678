"""Print docs/api.md: the gRPC services and messages (parsed from schemas/pb/*.proto, comments included) and the
HTTP routes (found in the FastAPI route decorators of the gateway and the admin API, read with `ast`).

    .venv/bin/python docs/gen_api.py > docs/api.md

Routes carry no docstrings, so each route's one-line summary lives in ROUTE_SUMMARIES below; a route without
one fails tests/deploy/test_docs.py (as does a committed docs/api.md that differs from this output).
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOS = sorted((REPO / "schemas" / "pb").glob("*.proto"))
ROUTE_FILES = [REPO / p for p in ("gateway/http/app.py", "gateway/http/openai.py", "gateway/http/feedback.py",
                                  "feedback/dashboard/api.py", "feedback/dashboard/models_api.py",
                                  "feedback/dashboard/budgets_api.py", "feedback/dashboard/release_api.py")]

ROUTE_SUMMARIES = {
    ("GET", "/healthz"): "liveness: 200 while the process serves",
    ("GET", "/readyz"): "readiness: 200 once models are loaded and the events path is up, 503 while not",
    ("GET", "/metrics"): "Prometheus metrics (requests, latency, tokens, guardrails, sink, spool, ingester)",
    ("POST", "/v1/chat/completions"): "OpenAI chat completions, `stream: true` for server-sent events",
    ("POST", "/v1/completions"): "OpenAI text completions",
    ("GET", "/v1/models"): "served models with their engine and active version",
    ("POST", "/v1/feedback"): "rate an inference (thumbs, rating, comment, correction, preference); idempotent "
                              "with `Idempotency-Key`",
    ("GET", "/admin/v1/overview"): "row counts, health and the dashboard's refresh interval",
    ("GET", "/admin/v1/metrics"): "monitor metrics over time (satisfaction, latency, cost, grades)",
    ("GET", "/admin/v1/drift"): "drift results and links to their HTML reports",
    ("GET", "/admin/v1/drift/reports/{path:path}"): "one drift run's HTML report (Evidently)",
    ("GET", "/admin/v1/guardrails"): "guardrail verdicts by detector and action",
    ("GET", "/admin/v1/latency"): "latency percentiles by model and version",
    ("GET", "/admin/v1/models"): "every model's versions and their current state",
    ("GET", "/admin/v1/canary"): "canary vs active: traffic share and satisfaction",
    ("GET", "/admin/v1/triggers"): "retrain triggers and their outcomes",
    ("GET", "/admin/v1/alerts"): "alerts fired and resolved",
    ("POST", "/admin/v1/models/{model}/versions/{version}/{action}"): "request promote / rollback / canary / "
                                                                      "reject of a version (applied by the registry)",
    ("GET", "/admin/v1/models/{model}/versions"): "a model's versions with state and history",
    ("GET", "/admin/v1/models/{model}/versions/{version}"): "one version: state, history, lineage",
    ("GET", "/admin/v1/lineage/{inference_id}"): "the chain behind a served response: version, dataset, trigger",
    ("POST", "/admin/v1/models/{model}/requests"): "request a lifecycle step by JSON body (action, version, reason)",
    ("GET", "/admin/v1/tenants"): "the tenants this key may view (an operator's key: every tenant in the store)",
    ("GET", "/admin/v1/spend"): "spend per tenant over time, budgets in force with this period's spend, budget alerts",
    ("GET", "/admin/v1/budgets"): "budgets in force with this period's spend, state and reset time (`?tenant=`)",
    ("POST", "/admin/v1/budgets"): "set or clear a tenant's or key's daily or monthly budget (soft and hard limits)",
    ("GET", "/admin/v1/models/{model}/versions/{version}/card"): "a version's model card, generated from the "
                                                                 "registry (Markdown; `?format=json`)",
    ("GET", "/admin/v1/models/{model}/changelog"): "what changed between two versions (`?from=A&to=B`): data, "
                                                   "recipe, metrics",
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    tags: tuple[str, ...]
    source: str


def http_routes() -> list[Route]:
    """Every route declared with `@<router>.<verb>("/path", ...)` in ROUTE_FILES, minus `include_in_schema=False`."""
    out: list[Route] = []
    for path in ROUTE_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                        and dec.func.attr in ("get", "post", "put", "patch", "delete")
                        and dec.args and isinstance(dec.args[0], ast.Constant)):
                    continue
                kw = {k.arg: k.value for k in dec.keywords}
                hidden = kw.get("include_in_schema")
                if isinstance(hidden, ast.Constant) and hidden.value is False:
                    continue
                tags: tuple[str, ...] = ()
                if isinstance(kw.get("tags"), ast.List):
                    tags = tuple(e.value for e in kw["tags"].elts if isinstance(e, ast.Constant))
                out.append(Route(dec.func.attr.upper(), dec.args[0].value, tags, str(path.relative_to(REPO))))
    return out


def _auth(route: Route) -> str:
    if route.path.startswith("/admin"):
        return "key with scope `admin`"
    if route.path == "/v1/feedback":
        return "key with scope `feedback`"
    if route.path.startswith("/v1"):
        return "key (scope `infer`)"
    return "none"


# ---- proto -------------------------------------------------------------------------------------------------

@dataclass
class ProtoFile:
    name: str
    package: str
    services: list[tuple[str, str, list[tuple[str, str, str, str]]]]  # name, comment, [(rpc, req, resp, comment)]
    messages: list[tuple[str, str, list[tuple[str, str, str, str]]]]  # name, comment, [(field, type, num, comment)]
    enums: list[tuple[str, str, list[str]]]


def parse_proto(path: Path) -> ProtoFile:
    """A small proto3 reader: services, rpcs, messages (oneof flattened), enums, with their `//` comments."""
    lines = path.read_text().splitlines()
    pf = ProtoFile(path.name, "", [], [], [])
    comment: list[str] = []
    stack: list[tuple[str, str, str, list]] = []  # (kind, name, comment, items)
    for raw in lines:
        line = raw.strip()
        trailing = ""
        if "//" in line and not line.startswith("//"):
            line, trailing = (s.strip() for s in line.split("//", 1))
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        if not line:
            comment = []
            continue
        text = " ".join(comment + ([trailing] if trailing else []))
        if m := re.match(r"package ([\w.]+);", line):
            pf.package = m.group(1)
        elif m := re.match(r"message (\w+) \{\s*\}", line):
            pf.messages.append((m.group(1), text, []))
        elif m := re.match(r"(service|message|enum|oneof) (\w+) \{", line):
            stack.append((m.group(1), m.group(2), text, []))
        elif line == "}":
            kind, name, doc, items = stack.pop()
            if kind == "service":
                pf.services.append((name, doc, items))
            elif kind == "message":
                pf.messages.append((name, doc, items))
            elif kind == "enum":
                pf.enums.append((name, doc, [i[0] for i in items]))
            else:  # oneof: its fields belong to the message, marked
                stack[-1][3].extend((f, t, n, f"(oneof `{name}`) {c}".strip()) for f, t, n, c in items)
        elif m := re.match(r"rpc (\w+)\((stream )?(\w+)\) returns \((stream )?([\w.]+)\);", line):
            stack[-1][3].append((m.group(1), (m.group(2) or "") + m.group(3), (m.group(4) or "") + m.group(5), text))
        elif (m := re.match(r"((?:optional |repeated )?[\w.]+) (\w+) = (\d+);", line)) and stack[-1][0] != "enum":
            stack[-1][3].append((m.group(2), m.group(1), m.group(3), text))
        elif m := re.match(r"(\w+) = (\d+);", line):
            stack[-1][3].append((m.group(1), "", m.group(2), text))
        comment = []
    return pf


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    out = ["# API reference", "",
           "<!-- generated by docs/gen_api.py from schemas/pb/*.proto and the FastAPI routes; do not edit by hand -->",
           "",
           "The gateway serves the same core over two front ends: gRPC on `gateway.grpc_port` (default 50051, "
           "server reflection on) and HTTP on `gateway.http_port` (default 8000; OpenAI-compatible). Both take an "
           "API key as `authorization: Bearer <key>` (gRPC metadata or HTTP header); create one with "
           "`servoloop keys create --tenant T [--scope admin]`. Errors: HTTP 4xx/5xx with a JSON body "
           "`{\"error\": {\"message\", \"type\", \"code\", \"param\"}}`; gRPC status codes with the same message.",
           "", "## HTTP routes", "",
           "| method | path | auth | what | source |", "|---|---|---|---|---|"]
    for r in http_routes():
        summary = ROUTE_SUMMARIES.get((r.method, r.path), "")
        out.append(f"| {r.method} | `{r.path}` | {_auth(r)} | {_cell(summary)} | `{r.source}` |")
    out += ["", "The admin routes (`/admin/...`) and the operator dashboard (`/admin/`) are served by the process "
            "that owns the store (`servoloop up`); the full OpenAPI document is at `/openapi.json` of a running "
            "gateway.", "", "## gRPC"]
    for path in PROTOS:
        pf = parse_proto(path)
        out += ["", f"### `{path.relative_to(REPO)}` (package `{pf.package}`)"]
        for name, doc, rpcs in pf.services:
            out += ["", f"#### service `{pf.package}.{name}`", ""]
            if doc:
                out += [doc, ""]
            out += ["| rpc | request | response | what |", "|---|---|---|---|"]
            out += [f"| `{r}` | `{req}` | `{resp}` | {_cell(c)} |" for r, req, resp, c in rpcs]
        for name, doc, values in pf.enums:
            out += ["", f"#### enum `{name}`", ""] + ([doc, ""] if doc else []) + [", ".join(f"`{v}`" for v in values)]
        for name, doc, fields in pf.messages:
            out += ["", f"#### message `{name}`", ""]
            if doc:
                out += [doc, ""]
            out += ["| # | field | type | notes |", "|---|---|---|---|"]
            out += [f"| {n} | `{f}` | `{t}` | {_cell(c)} |" for f, t, n, c in fields]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
