"""`servoloop up` as a real process: events survive a SIGKILL of the whole process and a stalled broker.

The process stores into a ClickHouse server over HTTP (the test-only endpoint in front of this test
process's chDB), so the test can read what arrived while `up` owns everything else: its embedded broker,
its spool under data_dir, its ingester.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from feedback.store import ClickHouseStore, count_rows
from tests.support.clickhouse_http import shared_endpoint
from tests.support.openai_upstream import RunningUpstream
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan

BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class UpProcess:
    config: Path
    http: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SERVOLOOP_CONFIG": str(self.config)}

    async def start(self, *args: str) -> None:
        log = open(self.data_dir.parent / "up.log", "ab")
        self.proc = subprocess.Popen([str(BIN / "servoloop"), "up", *args], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        async with httpx.AsyncClient() as http:
            for _ in range(600):
                assert self.proc.poll() is None, (self.data_dir.parent / "up.log").read_text()[-3000:]
                try:
                    if (await http.get(f"{self.http}/readyz", timeout=1)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("servoloop up did not become ready")

    def key(self) -> str:
        out = subprocess.run([str(BIN / "servoloop"), "keys", "create", "--tenant", "acme"], env=self.env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    def broker_pid(self) -> int:
        return int(json.loads((self.data_dir / "broker.json").read_text())["pid"])


@pytest.fixture
async def up(upstream: RunningUpstream, tmp_path: Path) -> AsyncIterator[tuple[UpProcess, ClickHouseStore]]:
    database = f"t_{uuid.uuid4().hex[:12]}"
    http_port, grpc_port = _free_port(), _free_port()
    config = tmp_path / "servoloop.yaml"
    config.write_text(f"""
data_dir: {tmp_path / "data"}
gateway:
  host: 127.0.0.1
  http_port: {http_port}
  grpc_port: {grpc_port}
  auth: {{reload_interval_s: 0.2}}
  models:
    - {{name: remote, engine: remote, url: "{upstream.url}"}}
events:
  store: {{kind: clickhouse, url: "{shared_endpoint().url}", database: {database}}}
  ingest: {{batch_max_wait_s: 0.1}}
""")
    process = UpProcess(config, f"http://127.0.0.1:{http_port}", tmp_path / "data")
    store = await ClickHouseStore.connect(shared_endpoint().url, database)
    yield process, store
    if process.proc is not None and process.proc.poll() is None:
        process.proc.terminate()  # a clean stop takes its embedded broker down too
        try:
            process.proc.wait(30)
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait()
    if (process.data_dir / "broker.json").exists():  # a killed run's orphan: leave no broker behind
        pid = process.broker_pid()
        with contextlib.suppress(OSError):
            if b"tansu" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    await store.query(f"DROP DATABASE IF EXISTS {database}")
    await store.aclose()


async def _requests(http: str, key: str, n: int) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(n):
            r = await client.post(f"{http}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "remote", "messages": [{"role": "user", "content": "hello"}],
                                        "max_tokens": 4})
            assert r.status_code == 200, r.text


async def _wait_rows(store: ClickHouseStore, n: int, timeout_s: float = 60.0) -> int:
    got = 0
    for _ in range(int(timeout_s * 4)):
        got = await count_rows(store, "inferences")
        if got >= n:
            return got
        await asyncio.sleep(0.25)
    return got


async def test_events_accepted_before_a_sigkill_of_up_arrive_after_its_restart(
        up: tuple[UpProcess, ClickHouseStore]) -> None:
    process, store = up
    await process.start()
    key = process.key()
    await asyncio.sleep(0.5)  # the key reaches the gateway
    first_broker = process.broker_pid()
    # The ingester is still forming its group, so these wait in the broker and in the spool.
    await _requests(process.http, key, 40)
    await asyncio.sleep(0.3)  # past the spool's group commit (fsync_interval_s 0.05)
    assert process.proc is not None
    process.proc.kill()
    process.proc.wait()
    print("rows stored before the kill:", await count_rows(store, "inferences"))

    await process.start()
    assert await _wait_rows(store, 40) == 40
    await _requests(process.http, key, 10)
    assert await _wait_rows(store, 50) == 50
    assert not Path(f"/proc/{first_broker}").exists()  # the orphaned broker of the killed run was reaped
    # the CLI finds the running embedded broker by itself
    tail = subprocess.run([str(BIN / "servoloop"), "events", "tail", "--from-beginning", "--type", "inference",
                           "--limit", "5"], env=process.env, capture_output=True, text=True, timeout=60)
    assert tail.returncode == 0, tail.stderr
    assert len([line for line in tail.stdout.splitlines() if "inference" in line]) == 5


async def test_a_stalled_broker_does_not_stall_requests_and_loses_nothing(
        up: tuple[UpProcess, ClickHouseStore]) -> None:
    process, store = up
    await process.start()
    key = process.key()
    await asyncio.sleep(0.5)
    await _requests(process.http, key, 5)
    assert await _wait_rows(store, 5) == 5
    broker = process.broker_pid()
    os.kill(broker, signal.SIGSTOP)  # the broker hangs: connections stay open, nothing is answered
    try:
        started = asyncio.get_running_loop().time()
        await _requests(process.http, key, 60)
        assert asyncio.get_running_loop().time() - started < 10  # served while the broker is frozen
        async with httpx.AsyncClient() as http:
            events = (await http.get(f"{process.http}/readyz")).json()["events"]
        assert events["sink_pending"] >= 60
    finally:
        os.kill(broker, signal.SIGCONT)
    assert await _wait_rows(store, 65) == 65
    got = await store.query("SELECT count() AS n, uniqExact(event_id) AS u FROM inferences FINAL")
    assert (got.column("n")[0].as_py(), got.column("u")[0].as_py()) == (65, 65)


async def test_no_broker_mode_serves_and_stores_through_the_spool(up: tuple[UpProcess, ClickHouseStore]) -> None:
    process, store = up
    await process.start("--no-broker")
    key = process.key()
    await asyncio.sleep(0.5)
    await _requests(process.http, key, 20)
    assert await _wait_rows(store, 20) == 20
    assert not (process.data_dir / "broker.json").exists()
    assert process.proc is not None
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(30) == 0


async def test_up_grades_served_traffic_into_the_store(up: tuple[UpProcess, ClickHouseStore]) -> None:
    process, store = up
    off = {"enabled": False}
    receiver = await OtlpReceiver().start()  # an OTLP collector and Langfuse: grading.export sends grades to both
    tracing = {"enabled": True, "endpoint": receiver.url, "schedule_delay_ms": 100,
               "langfuse": {"host": receiver.url, "public_key": receiver.langfuse_public_key,
                            "secret_key": receiver.langfuse_secret_key, "scores": False}}
    config = process.config.read_text().replace("gateway:\n", f"gateway:\n  tracing: {json.dumps(tracing)}\n", 1)
    process.config.write_text(config + "grading: " + json.dumps({
        "interval_s": 0.3, "settle_s": 0, "export": {"otel": True, "langfuse": True}, "graders": {
            "judge": {"sample_rate": 1.0}, "toxicity": off, "groundedness": off, "judge_pairwise": off}}) + "\n")
    key = process.key()  # before the start: the gateway reads it with the key store
    await process.start()
    await _requests(process.http, key, 5)
    graded = 0
    for _ in range(240):  # the grading worker inside `up` samples, grades and publishes through the pipeline
        try:
            graded = await count_rows(store, "grades")
        except Exception:  # not migrated yet
            graded = 0
        if graded >= 5:
            break
        await asyncio.sleep(0.25)
    assert graded == 5
    rows = await store.query("SELECT g.grader AS grader, i.event_id AS inference FROM grades AS g FINAL "
                             "INNER JOIN inferences AS i FINAL ON g.target_id = i.event_id")
    assert set(rows.column("grader").to_pylist()) == {"judge"} and rows.num_rows == 5
    traced = await store.query("SELECT event_id, trace_id, span_id FROM inferences FINAL")
    spans = dict(zip(traced.column("trace_id").to_pylist(), traced.column("span_id").to_pylist(), strict=True))
    try:  # each grade: a Langfuse score on its inference's trace, and an evaluation span under the inference's span
        await receiver.wait_for(lambda: len(receiver.scores) >= 5, timeout_s=30)
        assert {(b["name"], b["traceId"]) for b in receiver.scores} == {("judge", t) for t in spans}
        def evaluations() -> list[ReceivedSpan]:
            return [s for s in receiver.spans if s.name == "gen_ai.evaluation" and s.path == "/v1/traces"]
        await receiver.wait_for(lambda: len(evaluations()) >= 5, timeout_s=30)
        assert {(s.trace_id, s.parent_span_id) for s in evaluations()} == set(spans.items())
        assert all(s.events[0][0] == "gen_ai.evaluation.result" and s.events[0][1]["gen_ai.evaluation.name"] == "judge"
                   for s in evaluations())
        assert any(s.name == "gen_ai.evaluation" for s in receiver.spans if s.path.startswith("/api/public/otel"))
    finally:
        process.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        await asyncio.sleep(0)
    assert await asyncio.to_thread(process.proc.wait, 60) == 0  # type: ignore[union-attr]
    await receiver.stop()
