"""`servoloop models …` against a live admin API: a real gateway with the registry's routes over real chDB,
its request worker applying what the CLI asks (the CLI runs as its own process, as an operator runs it)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from feedback.dashboard import admin_extension
from feedback.dashboard.models_api import models_extension
from feedback.store import Store, write_events
from gateway.auth import KeyStore
from gateway.engines.remote import RemoteEngine
from gateway.server import Gateway, GatewayServer
from gateway.settings import GatewaySettings, ModelSettings, RateLimitSettings
from retrain.registry import StoreRegistry
from retrain.requests import RequestWorker, unanswered_requests
from schemas.artifacts import tree_sha256
from schemas.events import Event
from tests.retrain.test_lineage import Chain, seed_chain
from tests.support.openai_upstream import RunningUpstream

MODEL = "chat"


@dataclass
class Live:
    url: str
    key: str
    key_id: str
    infer_key: str
    registry: StoreRegistry
    chain: Chain
    data_dir: Path

    async def cli(self, *args: str, key: str | None = None) -> tuple[int, str, str]:
        env = {**os.environ, "SERVOLOOP_URL": self.url, "SERVOLOOP_ADMIN_KEY": self.key if key is None else key,
               "SERVOLOOP_DATA_DIR": str(self.data_dir), "COLUMNS": "200"}
        env.pop("SERVOLOOP_CONFIG", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from servoloop.cli import main; main()", "models", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, out.decode(), " ".join(err.decode().split())  # rich wraps stderr lines


@asynccontextmanager
async def live_registry(store: Store, keystore: KeyStore, tmp_path: Path, adapter: Path,
                        extensions: Callable[[Gateway], list[Any]] | None = None) -> AsyncIterator[Live]:
    """`servoloop up`'s wiring in small: admin + registry routes, requests published into the store (as the
    ingester would), one RequestWorker on the process's registry. `extensions`: more HTTP extensions."""
    registry = StoreRegistry(store, tmp_path / "artifacts")
    chain = await seed_chain(store, registry, adapter)
    tasks: set[asyncio.Task[object]] = set()

    def publish(event: Event) -> None:
        task = asyncio.get_running_loop().create_task(write_events(store, [event]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    upstream = await RunningUpstream().start()
    models = [ModelSettings(name=MODEL, engine="remote", url=upstream.url)]
    engines = {m.name: RemoteEngine(m) for m in models}
    for e in engines.values():
        await e.start()
    gw = Gateway(GatewaySettings(models=models, rate_limits=RateLimitSettings(
        requests_per_minute=0, tokens_per_minute=0, max_concurrent_streams=0)), keystore, engines=engines)
    gw.http_extensions.append(admin_extension(store, gw.auth.authenticate, publish=publish))
    gw.http_extensions.append(models_extension(store, gw.auth.authenticate, publish=publish))
    gw.http_extensions.extend(extensions(gw) if extensions else [])
    server = GatewayServer(gw, host="127.0.0.1", http_port=0, grpc_port=0)
    await server.start()
    worker = RequestWorker(registry, poll_s=0.1)
    await worker.start()
    key_id, key = keystore.create("ops", ["admin"])
    _, infer_key = keystore.create("acme", ["infer"])
    gw.auth.reload()
    try:
        yield Live(f"http://127.0.0.1:{server.http_port}", key, key_id, infer_key, registry, chain, tmp_path / "data")
    finally:
        await worker.aclose()
        await server.stop()
        for e in engines.values():
            await e.aclose()
        await upstream.stop()


@pytest.fixture
async def live(store: Store, keystore: KeyStore, tmp_path: Path, tiny_lora: Path) -> AsyncIterator[Live]:
    async with live_registry(store, keystore, tmp_path, tiny_lora) as lv:
        yield lv


async def test_list_show_and_lineage_from_an_inference_id(live: Live):
    rc, out, err = await live.cli("list", MODEL, "--json")
    assert rc == 0, err
    listed = json.loads(out)[0]
    assert listed["active"] == "v2" and listed["canary"] is None
    assert {v["version_id"]: v["state"] for v in listed["versions"]} == {
        "base": "retired", "v1": "retired", "v2": "active", "v3": "candidate"}
    rc, out, err = await live.cli("list")
    assert rc == 0 and "v2" in out and "active" in out and "candidate" in out, err

    rc, out, err = await live.cli("show", "--inference", live.chain.served.event_id)
    assert rc == 0, err
    assert f"inference {live.chain.served.event_id}: chat@v2" in out
    assert "chat@v2: active" in out and "promoted by: canary-monitor" in out
    assert f"trigger {live.chain.trigger.event_id}: dpo on chat@v1" in out and live.chain.trigger.reason in out
    assert "evidence: monitor satisfaction_drop thumbs_up_rate=0.55" in out
    assert "dataset: sha256 " + "d" * 64 in out
    assert f"source feedback (window): {len(live.chain.window_feedback)} rows" in out
    for f in live.chain.window_feedback:
        assert f.event_id in out
    rc, out, err = await live.cli("show", MODEL, "v2", "--lineage", "--json")
    assert rc == 0, err
    body = json.loads(out)
    assert body["trigger"]["event_id"] == live.chain.trigger.event_id
    assert [r["event_id"] for r in body["feedback"]["rows"]] == [f.event_id for f in live.chain.window_feedback]
    rc, out, _ = await live.cli("show", MODEL, "v3")
    assert rc == 0 and "chat@v3: candidate" in out and "trigger" not in out  # lineage only on request


async def test_actions_are_applied_by_the_registry_and_refusals_exit_2_with_the_reason(live: Live):
    rc, _, err = await live.cli("promote", MODEL, "v3", "--reason", "manual")
    assert rc == 0 and "promote chat@v3: active" in err, err
    assert (await live.registry.active(MODEL)).version_id == "v3"  # type: ignore[union-attr]
    v3 = await live.registry.get(MODEL, "v3")
    assert v3.lineage["promotion"]["by"] == live.key_id  # the operator's key id
    assert v3.lineage["promotion"]["reason"] == "manual"
    rc, _, err = await live.cli("rollback", MODEL, "v3")
    assert rc == 0 and "rollback chat@v3: rolled_back" in err, err
    assert (await live.registry.active(MODEL)).version_id == "v2"  # type: ignore[union-attr]
    rc, _, err = await live.cli("promote", MODEL, "v3")
    assert rc == 2 and "cannot promote a version in state 'rolled_back'" in err, err
    await live.registry.register_candidate(model=MODEL, base_model="tiny-chat", adapter_dir=Path(
        (await live.registry.get(MODEL, "v2")).adapter_path), lineage={}, actor="t", version_id="v4")
    rc, _, err = await live.cli("canary", MODEL, "v4", "--share", "0.3")
    assert rc == 0 and "canary chat@v4: canary" in err, err
    assert (await live.registry.canary(MODEL)).canary_share == 0.3  # type: ignore[union-attr]
    rc, _, err = await live.cli("reject", MODEL, "v4", "--reason", "worse")
    assert rc == 2 and "cannot reject a version in state 'canary'" in err, err
    rc, _, err = await live.cli("rollback", MODEL, "v4")
    assert rc == 0 and (await live.registry.get(MODEL, "v4")).state == "rolled_back"


async def test_unknown_names_bad_keys_and_an_unreachable_api_are_clear_errors(live: Live):
    rc, _, err = await live.cli("show", MODEL, "nope")
    assert rc == 2 and "model 'chat' has no version 'nope'" in err
    rc, _, err = await live.cli("list", "nomodel")
    assert rc == 2 and "unknown model 'nomodel'" in err
    rc, _, err = await live.cli("promote", "nomodel", "v1")
    assert rc == 2 and "unknown model 'nomodel'" in err
    rc, _, err = await live.cli("show", "--inference", "no-such-id")
    assert rc == 2 and "no inference 'no-such-id'" in err
    rc, _, err = await live.cli("list", key=live.infer_key)
    assert rc == 2 and "insufficient_scope" in err
    rc, _, err = await live.cli("list", key="sl-000000000000-nope")
    assert rc == 2 and "invalid_api_key" in err
    rc, _, err = await live.cli("list", "--url", "http://127.0.0.1:9")
    assert rc == 2 and "cannot reach the admin API" in err
    rc, _, err = await live.cli("show", MODEL)
    assert rc == 2 and "give MODEL VERSION, or --inference ID" in err


async def test_export_merges_the_verified_adapter_into_the_base_weights(live: Live, tiny_model_dir: Path,
                                                                        tmp_path: Path):
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from servoloop.commands.models import app

    # in this process (torch is loaded here already); the other cases below run the real command line
    env = {"SERVOLOOP_URL": live.url, "SERVOLOOP_ADMIN_KEY": live.key, "SERVOLOOP_DATA_DIR": str(live.data_dir)}
    result = await asyncio.to_thread(CliRunner().invoke, app, ["export", MODEL, "v2", "--out", str(tmp_path / "merged"),
                                                              "--base", str(tiny_model_dir)], env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer_config.json").is_file()
    assert json.loads((merged / "servoloop_lineage.json").read_text())["version_id"] == "v2"
    weights = load_file(merged / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    q = next(k for k in base if k.endswith("q_proj.weight"))
    assert not any("lora" in k for k in weights)
    assert not torch.equal(weights[q], base[q])  # the LoRA delta is in the weights
    rc, _, err = await live.cli("export", MODEL, "v2", "--adapter", "--out", str(tmp_path / "adapter"))
    assert rc == 0 and tree_sha256(tmp_path / "adapter") == (await live.registry.get(MODEL, "v2")).artifact_sha256
    # a tampered artifact is refused before anything is loaded
    v1 = await live.registry.get(MODEL, "v1")
    (Path(v1.adapter_path) / "adapter_config.json").write_text("{}")
    rc, _, err = await live.cli("export", MODEL, "v1", "--out", str(tmp_path / "bad"), "--base", str(tiny_model_dir))
    assert rc == 2 and "hashes to" in err and not (tmp_path / "bad").exists()
    rc, _, err = await live.cli("export", MODEL, "base", "--out", str(tmp_path / "none"))
    assert rc == 2 and "has no adapter" in err


async def test_registry_routes_need_the_admin_scope_validate_requests_and_dashboard_requests_are_applied(live: Live):
    import httpx

    async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}) as c:
        for path in (f"/admin/v1/models/{MODEL}/versions", f"/admin/v1/models/{MODEL}/versions/v2",
                     f"/admin/v1/lineage/{live.chain.served.event_id}"):
            assert (await c.get(path)).status_code == 200
            r = await c.get(path, headers={"Authorization": f"Bearer {live.infer_key}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
            assert (await c.get(path, headers={"Authorization": ""})).status_code == 401
        r = await c.post(f"/admin/v1/models/{MODEL}/requests", json={"version": "v3", "action": "explode"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "action"
        r = await c.post(f"/admin/v1/models/{MODEL}/requests", json={"version": "v3", "action": "canary", "share": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "share"
        r = await c.post(f"/admin/v1/models/{MODEL}/requests", json={"version": "v3", "action": "canary", "x": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"
        r = await c.post(f"/admin/v1/models/{MODEL}/requests", json={"version": "v9", "action": "promote"})
        assert r.status_code == 404 and "has no version 'v9'" in r.json()["error"]["message"]
        r = await c.post(f"/admin/v1/models/{MODEL}/requests", headers={"Authorization": f"Bearer {live.infer_key}"},
                         json={"version": "v3", "action": "promote"})
        assert r.status_code == 403
        # the dashboard's button (feedback/dashboard/api.py): approve = send to canary at the default share
        r = await c.post(f"/admin/v1/models/{MODEL}/versions/v3/approve", json={"reason": "looks good"})
        assert r.status_code == 202
        request_id = r.json()["event_id"]
        for _ in range(100):
            body = (await c.get(f"/admin/v1/models/{MODEL}/versions/v3")).json()
            if body["state"] == "canary":
                break
            await asyncio.sleep(0.1)
        assert body["state"] == "canary" and body["canary_share"] == 0.1
        assert body["history"][-1]["request_id"] == request_id and body["history"][-1]["actor"] == live.key_id
        assert body["history"][-1]["reason"] == "looks good"
        # a refused request shows as answered, not as the version's state, on the dashboard
        r = await c.post(f"/admin/v1/models/{MODEL}/versions/v1/promote")
        assert r.status_code == 202
        request_id = r.json()["event_id"]
        for _ in range(100):
            body = (await c.get(f"/admin/v1/models/{MODEL}/versions/v1")).json()
            if body["history"][-1]["request_id"] == request_id:
                break
            await asyncio.sleep(0.1)
        assert body["history"][-1]["state"] == "request_refused" and body["state"] == "retired"
        assert "cannot promote a version in state 'retired'" in body["history"][-1]["reason"]
        timeline = (await c.get("/admin/v1/models", params={"model": MODEL})).json()["models"][0]["versions"]
        v1 = next(v for v in timeline if v["version_id"] == "v1")
        assert v1["state"] == "retired" and v1["requested"] == []


async def test_direct_mode_reads_and_writes_a_clickhouse_server(store: Store, tmp_path: Path, tiny_lora: Path):
    from tests.support.clickhouse_http import shared_endpoint

    registry = StoreRegistry(store, tmp_path / "artifacts")
    await seed_chain(store, registry, tiny_lora)
    env = {**os.environ, "SERVOLOOP_EVENTS__STORE__KIND": "clickhouse", "SERVOLOOP_DATA_DIR": str(tmp_path / "d"),
           "SERVOLOOP_EVENTS__STORE__URL": shared_endpoint().url, "SERVOLOOP_EVENTS__STORE__DATABASE": store.database}
    env.pop("SERVOLOOP_CONFIG", None)

    async def cli(*args: str, environ: dict[str, str] = env) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from servoloop.cli import main; main()", "models", *args, env=environ,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, out.decode(), " ".join(err.decode().split())

    rc, out, err = await cli("list", MODEL, "--direct", "--json")
    assert rc == 0, err
    assert json.loads(out)[0]["active"] == "v2"
    rc, _, err = await cli("promote", MODEL, "v3", "--direct", "--reason", "direct")
    assert rc == 0 and "promote chat@v3: active" in err, err
    v3 = await registry.active(MODEL)
    assert v3 is not None and v3.version_id == "v3" and v3.lineage["promotion"]["by"].startswith("cli:")
    assert await unanswered_requests(store) == []  # applied in place: nothing left for a `servoloop up` to redo
    rc, _, err = await cli("promote", MODEL, "v1", "--direct")
    assert rc == 2 and "cannot promote a version in state 'retired'" in err
    embedded = {k: v for k, v in env.items() if not k.startswith("SERVOLOOP_EVENTS__")}
    rc, _, err = await cli("list", "--direct", environ=embedded)
    assert rc == 2 and "--direct needs events.store.kind: clickhouse" in err


async def test_servoloop_up_applies_cli_requests_through_its_broker_ingester_and_registry(
        store: Store, tmp_path: Path, tiny_lora: Path):
    """The real wiring: `servoloop up` (embedded broker, ingester, request worker) owns the registry; the CLI's
    request travels sink -> Kafka -> ingester -> store, the worker applies it, and the answer reaches the CLI."""
    import signal
    import socket
    import subprocess

    import httpx

    from tests.support.clickhouse_http import shared_endpoint

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    registry = StoreRegistry(store, tmp_path / "artifacts")
    await seed_chain(store, registry, tiny_lora)
    upstream = await RunningUpstream().start()
    http_port = free_port()
    config = tmp_path / "servoloop.yaml"
    config.write_text(f"""
data_dir: {tmp_path / "data"}
gateway:
  host: 127.0.0.1
  http_port: {http_port}
  grpc_port: {free_port()}
  auth: {{reload_interval_s: 0.2}}
  models:
    - {{name: {MODEL}, engine: remote, url: "{upstream.url}"}}
events:
  store: {{kind: clickhouse, url: "{shared_endpoint().url}", database: {store.database}}}
  ingest: {{batch_max_wait_s: 0.1}}
monitors: {{enabled: false}}
""")
    env = {**os.environ, "SERVOLOOP_CONFIG": str(config)}
    servoloop = str(Path(sys.executable).parent / "servoloop")
    key = subprocess.run([servoloop, "keys", "create", "--tenant", "ops", "--scope", "admin"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    log = open(tmp_path / "up.log", "ab")
    proc = subprocess.Popen([servoloop, "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(900):
                assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
                try:
                    if (await http.get(f"{url}/readyz", timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        cli_env = {**env, "SERVOLOOP_URL": url, "SERVOLOOP_ADMIN_KEY": key}

        async def cli(*args: str) -> tuple[int, str, str]:
            p = await asyncio.create_subprocess_exec(servoloop, "models", *args, env=cli_env,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(p.communicate(), 120)
            return p.returncode or 0, out.decode(), " ".join(err.decode().split())

        rc, _, err = await cli("promote", MODEL, "v3", "--reason", "via up")
        assert rc == 0 and "promote chat@v3: active" in err, (err, (tmp_path / "up.log").read_text()[-3000:])
        rc, _, err = await cli("rollback", MODEL, "v2")
        assert rc == 2 and "cannot rollback a version in state 'retired'" in err, err
        assert {v.version_id: v.state for v in await registry.versions(MODEL)} == {
            "base": "retired", "v1": "retired", "v2": "retired", "v3": "active"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        await upstream.stop()
    assert proc.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
