"""`servoloop retrain worker`, the training-worker process of deploy/compose and deploy/k8s: it starts on the
configured store, applies pending model action requests through its registry (it is the one registry writer
outside `servoloop up`), and stops cleanly on SIGTERM. Real chDB store, real subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from feedback.settings import StoreSettings
from feedback.store import migrate, open_store, write_events
from retrain.requests import request_event
from tests.deploy.conftest import REPO


async def _store_call(data_dir: Path, fn):
    store = await open_store(StoreSettings(kind="chdb"), data_dir=data_dir)
    try:
        return await fn(store)
    finally:
        await store.aclose()


def test_worker_answers_a_pending_model_request_and_stops_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "servoloop.yaml"
    config.write_text(f"data_dir: {data_dir}\nevents:\n  broker: {{mode: none}}\n"
                      "gateway:\n  models: [{name: tiny-chat, engine: transformers, path: /nonexistent}]\n")
    request = request_event(model="tiny-chat", version_id="v-missing", action="promote", actor="test")

    async def seed(store):
        await migrate(store)
        await write_events(store, [request])

    asyncio.run(_store_call(data_dir, seed))
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

    async def answers(store):
        table = await store.query("SELECT state, lineage FROM model_events FINAL WHERE version_id = 'v-missing'")
        return [(s, json.loads(lin)) for s, lin in zip(table.column("state").to_pylist(),
                                                       table.column("lineage").to_pylist(), strict=True)]

    rows = asyncio.run(_store_call(data_dir, answers))
    refused = [lineage for state, lineage in rows if state == "request_refused"]
    assert refused and refused[0].get("request_id") == request.event_id, rows
