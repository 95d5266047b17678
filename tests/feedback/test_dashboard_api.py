"""The admin API behind the operator dashboard, served by a real gateway over seeded chDB data; Grafana files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.dashboard import plotly_js
from feedback.dashboard.api import parse_span, report_file, report_link
from gateway.auth import KeyStore
from schemas.events import ModelEvent
from tests.browser.dashboard_support import (
    HOUR,
    QUALITY_V1,
    AdminGateway,
    Seeded,
    admin_gateway,
    new_store,
    seed_dashboard,
)

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"


@pytest.fixture
async def seeded(tmp_path: Path) -> AsyncIterator[tuple[object, Seeded]]:
    store = await new_store()
    yield store, await seed_dashboard(store, tmp_path / "reports")
    await store.query(f"DROP DATABASE IF EXISTS {store.database}")


@pytest.fixture
async def admin(seeded: tuple[object, Seeded], keystore: KeyStore) -> AsyncIterator[AdminGateway]:
    store, data = seeded
    async with admin_gateway(store, keystore, report_dir=data.report_dir) as gw:  # type: ignore[arg-type]
        yield gw


@pytest.fixture
async def client(admin: AdminGateway) -> AsyncIterator[httpx.AsyncClient]:
    _, key = admin.key()
    async with httpx.AsyncClient(base_url=admin.http, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def hour(data: Seeded, **extra: str) -> dict[str, str]:
    """The seeded hour as query parameters."""
    return {"since": str(data.base_ms), "until": str(data.base_ms + HOUR), **extra}


async def test_admin_api_refuses_missing_bad_and_non_admin_keys_with_the_gateway_error_shape(admin: AdminGateway):
    _, infer_key = admin.key("acme", ("infer", "feedback"))
    async with httpx.AsyncClient(base_url=admin.http) as c:
        for path in ("/admin/v1/overview", "/admin/v1/models", "/admin/v1/drift/reports/drift-chat-v1-run1.html"):
            r = await c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.json()["error"]["type"] == "authentication_error"
            r = await c.get(path, headers={"Authorization": "Bearer sl-000000000000-nope"})
            assert r.status_code == 401
            r = await c.get(path, headers={"Authorization": f"Bearer {infer_key}"})
            assert r.status_code == 403
            assert r.json()["error"] | {"message": ""} == {"message": "", "type": "permission_error", "param": None,
                                                            "code": "insufficient_scope"}
        r = await c.post("/admin/v1/models/chat/versions/v2/rollback", headers={"Authorization": f"Bearer {infer_key}"})
        assert r.status_code == 403 and admin.published == []


async def test_overview_counts_every_table_and_reports_health(client: httpx.AsyncClient, seeded):
    _, data = seeded
    body = (await client.get("/admin/v1/overview", params={"since": str(data.base_ms),
                                                           "until": str(data.base_ms + HOUR)})).json()
    assert {t: v["total"] for t, v in body["tables"].items()} == {
        "inferences": 20, "feedback": 0, "guardrail_verdicts": 10, "monitor_results": 8, "retrain_triggers": 1,
        "model_events": 5}
    assert body["tables"]["model_events"]["in_span"] == 2
    assert body["health"] == {"broker": "none", "sink": "ok"}
    assert body["actions_enabled"] is True and body["refresh_s"] == 2


async def test_metrics_are_quality_series_with_their_confidence_intervals(client: httpx.AsyncClient, seeded):
    _, data = seeded
    body = (await client.get("/admin/v1/metrics", params={**hour(data), "metric": "thumbs_up_rate"})).json()
    [series] = body["series"]
    assert (series["model"], series["model_version"], series["monitor"]) == ("chat", "v1", "satisfaction_drop")
    assert [(p["t"], p["value"], p["ci_low"], p["ci_high"]) for p in series["points"]] == [
        (t, *q) for t, q in zip(data.quality_ts, QUALITY_V1, strict=True)]
    assert [p["status"] for p in series["points"]] == ["ok", "ok", "alert"]
    everything = (await client.get("/admin/v1/metrics", params=hour(data))).json()["series"]
    assert {s["metric"] for s in everything} == {"thumbs_up_rate", "mean_rating"}  # drift results are not here
    rating = next(s for s in everything if s["metric"] == "mean_rating")["points"]
    assert [(p["value"], p["ci_low"], p["ci_high"]) for p in rating] == [(4.2, 3.9, 4.5), (None, None, None)]


async def test_drift_shows_the_latest_score_per_feature_with_a_report_link(client: httpx.AsyncClient, seeded):
    _, data = seeded
    features = (await client.get("/admin/v1/drift", params=hour(data))).json()["features"]
    assert [(f["feature"], f["score"], f["drifted"], f["status"], f["monitor"]) for f in features] == [
        ("dataset_drift", 0.5, True, "alert", "request_drift"), ("prompt_length", 0.31, True, "warn", "request_drift"),
        ("tokens_in", 0.02, False, "ok", "request_drift")]  # the embedding run without enough samples has no score
    assert {f["report_url"] for f in features} == {"/admin/v1/drift/reports/drift-chat-v1-run1.html"}
    r = await client.get(features[0]["report_url"])
    assert r.status_code == 200 and "drift report run1" in r.text and r.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("path", ["..%2Fsecret.html", "run1/..%2F..%2Fsecret.html", "%2Fetc%2Fpasswd",
                                  "missing.html", "%2E%2E", "drift-chat-v1-run1.html%00"])
async def test_drift_reports_never_leave_the_report_directory(client: httpx.AsyncClient, path: str):
    r = await client.get(f"/admin/v1/drift/reports/{path}")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"


async def test_guardrail_rates_by_finding_type_and_action(client: httpx.AsyncClient, seeded):
    _, data = seeded
    body = (await client.get("/admin/v1/guardrails", params=hour(data, step="1h"))).json()
    assert body["buckets"] == [{"t": data.base_ms, "verdicts": 10}]
    assert {t["type"]: (t["points"][0]["rate"], t["points"][0]["findings"]) for t in body["types"]} == {
        "pii_email": (0.4, 4), "prompt_injection": (0.2, 4)}
    assert body["actions"]["block"][0]["rate"] == 0.2 and body["actions"]["redact"][0]["rate"] == 0.4


async def test_latency_percentiles_tokens_and_cost_per_bucket(client: httpx.AsyncClient, seeded):
    _, data = seeded
    [model] = (await client.get("/admin/v1/latency", params=hour(data, step="1h"))).json()["models"]
    [p] = model["points"]
    assert model["model"] == "chat" and p["t"] == data.base_ms
    # 20 latencies 10..200 ms: exact quantiles pick the element at floor(level * n) of the sorted values
    assert (p["p50_ms"], p["p95_ms"], p["p99_ms"]) == (110.0, 200.0, 200.0)
    assert (p["requests"], p["errors"], p["tokens_in"], p["tokens_out"]) == (20, 1, 200, 100)
    assert p["cost"] == pytest.approx(200 / 1000 * 0.5 + 100 / 1000 * 1.5)


async def test_models_timeline_links_each_version_to_the_trigger_that_caused_it(client: httpx.AsyncClient, seeded):
    _, data = seeded
    body = (await client.get("/admin/v1/models")).json()
    assert body["actions"] == ["approve", "promote", "rollback"]
    [chat] = body["models"]
    versions = {v["version_id"]: v for v in chat["versions"]}
    assert [v["version_id"] for v in chat["versions"]] == ["v2", "v1"]  # newest first
    assert versions["v1"]["state"] == "active" and versions["v1"]["trigger"] is None
    assert [e["state"] for e in versions["v1"]["events"]] == ["candidate", "canary", "active"]
    assert versions["v2"]["state"] == "canary"
    assert versions["v2"]["trigger"]["event_id"] == data.trigger.event_id
    assert versions["v2"]["trigger"]["reason"] == data.trigger.reason


async def test_triggers_and_alerts_list_the_recent_ones(client: httpx.AsyncClient, seeded):
    _, data = seeded
    [trigger] = (await client.get("/admin/v1/triggers", params={"since": "1d"})).json()["triggers"]
    assert (trigger["event_id"], trigger["method"], trigger["window_end_ms"]) == (
        data.trigger.event_id, "dpo", data.base_ms + 45 * 60_000)
    alerts = (await client.get("/admin/v1/alerts", params={"since": "1d"})).json()["alerts"]
    assert [(a["monitor"], a["metric"], a["value"]) for a in alerts] == [
        ("satisfaction_drop", "thumbs_up_rate", 0.5), ("request_drift", "dataset_drift", 0.5),
        ("request_drift", "dataset_drift", 0.9)]
    assert alerts[0]["details"]["p_value"] == 0.001
    some = (await client.get("/admin/v1/alerts", params={"since": "1d", "status": "insufficient_data,alert",
                                                          "limit": "4"})).json()["alerts"]
    assert sorted(a["status"] for a in some) == ["alert", "alert", "insufficient_data", "insufficient_data"]


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/admin/v1/metrics", {"since": "yesterday"}, "since"),
    ("/admin/v1/metrics", {"since": "2026-01-01T00:00:00"}, "since"),  # no time zone
    ("/admin/v1/metrics", {"since": "1795428000000", "until": "2026-11-23T00:00:00Z"}, "since"),  # after until
    ("/admin/v1/metrics", {"since": "365d"}, "since"),
    ("/admin/v1/guardrails", {"since": "24h", "step": "1s"}, "step"),
    ("/admin/v1/latency", {"step": "0"}, "step"),
    ("/admin/v1/latency", {"step": "soon"}, "step"),
    ("/admin/v1/metrics", {"metric": "x' OR 1=1 --"}, "metric"),
    ("/admin/v1/drift", {"model": "a" * 300}, "model"),
    ("/admin/v1/triggers", {"limit": "0"}, "limit"),
    ("/admin/v1/alerts", {"status": "firing"}, "status"),
    ("/admin/v1/overview", {"window": "1h"}, "window"),
])
async def test_bad_query_parameters_get_400_naming_the_field(client: httpx.AsyncClient, path: str,
                                                             params: dict[str, str], param: str):
    r = await client.get(path, params=params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_request"


async def test_an_action_request_publishes_a_model_event_and_answers_202(client: httpx.AsyncClient,
                                                                          admin: AdminGateway):
    key_id = client.headers["authorization"].split("-")[1]  # keys read sl-<key id>-<secret>
    r = await client.post("/admin/v1/models/chat/versions/v2/rollback", json={"reason": "complaints spiking"})
    assert r.status_code == 202, r.text
    [event] = admin.published
    assert isinstance(event, ModelEvent)
    assert (event.model, event.version_id, event.state, event.previous_state, event.actor, event.reason) == (
        "chat", "v2", "rollback_requested", "canary", key_id, "complaints spiking")
    assert event.base_model == "tiny-chat" and event.adapter_path == "/adapters/v2"
    assert r.json() | {"event_id": ""} == {"event_id": "", "status": "requested", "action": "rollback",
                                           "model": "chat", "version_id": "v2", "state": "rollback_requested",
                                           "previous_state": "canary"}
    assert r.json()["event_id"] == event.event_id
    r = await client.post("/admin/v1/models/chat/versions/v1/promote")  # no body: a default reason
    assert r.status_code == 202 and admin.published[-1].reason == "operator requested promote"


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/admin/v1/models/chat/versions/v2/delete", None, 404, "action"),
    ("/admin/v1/models/chat/versions/v9/rollback", None, 404, "version"),
    ("/admin/v1/models/nope/versions/v2/approve", None, 404, "version"),
    ("/admin/v1/models/chat/versions/v2/rollback", b"{not json", 400, "body"),
    ("/admin/v1/models/chat/versions/v2/rollback", b'{"reason": 3}', 400, "reason"),
    ("/admin/v1/models/chat/versions/v2/rollback", b'{"reason": "x", "force": true}', 400, "body"),
    ("/admin/v1/models/chat/versions/v2/rollback", json.dumps({"reason": "x" * 1001}).encode(), 400, "reason"),
    ("/admin/v1/models/chat/versions/v2/rollback", b"x" * 20_000, 400, "body"),
    ("/admin/v1/models/%20chat/versions/v2/rollback", None, 400, "model"),
])
async def test_bad_action_requests_publish_nothing(client: httpx.AsyncClient, admin: AdminGateway, path: str,
                                                   body: bytes | None, status: int, param: str):
    r = await client.post(path, content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert admin.published == []


async def test_a_read_only_dashboard_refuses_actions_with_503(seeded, keystore: KeyStore, tmp_path: Path):
    store, _ = seeded
    async with admin_gateway(store, keystore, report_dir=None, read_only=True) as gw:
        _, key = gw.key()
        async with httpx.AsyncClient(base_url=gw.http, headers={"Authorization": f"Bearer {key}"}) as c:
            assert (await c.get("/admin/v1/models")).json()["actions"] == []
            r = await c.post("/admin/v1/models/chat/versions/v2/rollback")
            assert r.status_code == 503 and r.json()["error"]["code"] == "actions_unavailable"
            features = (await c.get("/admin/v1/drift", params={"since": "1d"})).json()["features"]
            assert features and all(f["report_url"] is None for f in features)  # no report directory: no links
            assert (await c.get("/admin/v1/drift/reports/drift-chat-v1-run1.html")).status_code == 404
        assert gw.published == []


async def test_the_dashboard_page_and_its_scripts_are_served_without_data(admin: AdminGateway):
    async with httpx.AsyncClient(base_url=admin.http, follow_redirects=True) as c:
        page = await c.get("/admin")
        assert page.status_code == 200 and "/admin/dashboard/static/plotly.min.js" in page.text
        js = await c.get("/admin/dashboard/static/plotly.min.js")
        assert js.status_code == 200 and js.content == plotly_js().read_bytes()
        assert (await c.get("/admin/dashboard/static/dashboard.js")).status_code == 200
        assert (await c.get("/admin/dashboard/static/..%2Fapi.py")).status_code == 404


# -- pure parts ------------------------------------------------------------------------------------------------------

NOW = 1_795_430_000_000


def test_time_windows_take_durations_epoch_ms_and_iso_times_with_a_zone():
    assert parse_span({}, now_ms=NOW).start_ms == NOW - 86_400_000  # default: the last 24 h
    span = parse_span({"since": "90m", "until": "1795420000000", "step": "5m"}, now_ms=NOW)
    assert (span.start_ms, span.end_ms, span.step_s) == (1_795_420_000_000 - 5_400_000, 1_795_420_000_000, 300)
    span = parse_span({"since": "2026-11-23T00:00:00Z", "until": "2026-11-23T01:00:00+00:00"}, now_ms=NOW)
    assert span.end_ms - span.start_ms == 3_600_000 and span.step_s == 30  # automatic: at most 200 buckets


@pytest.fixture(scope="module")
def report_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    (root / "reports" / "sub").mkdir(parents=True)
    (root / "reports" / "sub" / "a.html").write_text("a")
    (root / "reports" / "notes.txt").write_text("no")
    (root / "outside.html").write_text("secret")
    (root / "reports" / "link.html").symlink_to(root / "outside.html")
    return (root / "reports").resolve()


def test_report_links_point_only_at_html_files_inside_the_report_directory(report_tree: Path):
    assert report_link(report_tree, str(report_tree / "sub" / "a.html")) == "/admin/v1/drift/reports/sub/a.html"
    assert report_link(report_tree, "sub/a.html") == "/admin/v1/drift/reports/sub/a.html"
    for outside in (str(report_tree.parent / "outside.html"), "../outside.html", "link.html", "notes.txt", "", None):
        assert report_link(report_tree, outside) is None, outside
    assert report_link(None, "sub/a.html") is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "sub", "a.html", "link.html", "outside.html", "", "/", "x" * 300,
                                 "notes.txt", "%2e%2e", "\\", "reports"]), max_size=6), st.text(max_size=20))
def test_no_request_path_reaches_a_file_outside_the_report_directory(report_tree: Path, parts: list[str], junk: str):
    for relative in ("/".join(parts), "/".join(parts) + junk, junk):
        found = report_file(report_tree, relative)
        assert found is None or (found.is_relative_to(report_tree) and found.suffix == ".html"), relative


# -- Grafana ---------------------------------------------------------------------------------------------------------


def _dashboards() -> list[Path]:
    return sorted((GRAFANA / "dashboards").glob("*.json"))


def test_grafana_dashboards_are_valid_json_over_the_provisioned_datasources():
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "servoloop.yaml").read_text())
    uids = {d["uid"]: d["type"] for d in provisioned["datasources"]}
    assert uids == {"servoloop-clickhouse": "grafana-clickhouse-datasource", "servoloop-prometheus": "prometheus"}
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "servoloop.yaml").read_text())["providers"]
    assert providers and providers[0]["type"] == "file"
    assert len(_dashboards()) >= 2
    for path in _dashboards():
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"] and board["panels"], path
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                ds = target.get("datasource") or panel["datasource"]
                assert uids[ds["uid"]] == ds["type"], (path.name, panel["title"])
                assert target.get("rawSql") or target.get("expr"), (path.name, panel["title"])


async def test_grafana_clickhouse_queries_run_on_the_real_schema(seeded):
    """Every panel's SQL, with Grafana's macros expanded, runs against the migrated tables and returns rows."""
    store, data = seeded
    start, end = data.base_ms, data.base_ms + HOUR
    macros = {
        "$__timeFilter(ts)": f"ts >= fromUnixTimestamp64Milli({start}, 'UTC') AND ts < fromUnixTimestamp64Milli({end}, 'UTC')",
        "$__timeInterval(ts)": "toStartOfInterval(ts, INTERVAL 60 second)",
        "$__interval_s": "60",
    }
    ran = 0
    for path in _dashboards():
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if sql := target.get("rawSql"):
                    for macro, value in macros.items():
                        sql = sql.replace(macro, value)
                    assert "$__" not in sql, (panel["title"], sql)
                    await store.query(sql)  # type: ignore[attr-defined]
                    ran += 1
    assert ran >= 5
