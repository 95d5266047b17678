"""`servoloop retrain worker`, the training-worker process of deploy/compose and deploy/k8s: it starts on the
configured store, applies pending model action requests through its registry (it is the one registry writer
outside `servoloop up`), and stops cleanly on SIGTERM. Real subprocess, on a ClickHouse store (the test-only
HTTP endpoint in front of this process's chDB, which this process reads directly)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from feedback.store import ChdbStore, migrate, write_events
from retrain.requests import request_event
from tests.deploy.conftest import REPO
from tests.support.clickhouse_http import shared_chdb_session, shared_endpoint


def test_worker_answers_a_pending_model_request_and_stops_on_sigterm(tmp_path: Path) -> None:
    data_dir, database = tmp_path / "data", f"t_{uuid.uuid4().hex[:12]}"
    store = ChdbStore(shared_chdb_session(), database)
    config = tmp_path / "servoloop.yaml"
    config.write_text(f"data_dir: {data_dir}\nevents:\n  broker: {{mode: none}}\n"
                      f"  store: {{kind: clickhouse, url: '{shared_endpoint().url}', database: {database}}}\n"
                      "gateway:\n  models: [{name: tiny-chat, engine: transformers, path: /nonexistent}]\n")
    request = request_event(model="tiny-chat", version_id="v-missing", action="promote", actor="test")

    async def seed() -> None:
        await migrate(store)
        await write_events(store, [request])

    asyncio.run(seed())
    proc = subprocess.Popen([sys.executable, "-m", "servoloop.cli", "retrain", "worker", "-c", str(config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if request.event_id in line:  # the request worker logged its answer
                break
        assert any(request.event_id in line and "request_refused" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def answers() -> list[tuple[str, dict]]:  # type: ignore[type-arg]
        table = await store.query("SELECT state, lineage FROM model_events FINAL WHERE version_id = 'v-missing'")
        await store.query(f"DROP DATABASE IF EXISTS {database}")
        return [(s, json.loads(lin)) for s, lin in zip(table.column("state").to_pylist(),
                                                       table.column("lineage").to_pylist(), strict=True)]

    rows = asyncio.run(answers())
    refused = [lineage for state, lineage in rows if state == "request_refused"]
    assert refused and refused[0].get("request_id") == request.event_id, rows
