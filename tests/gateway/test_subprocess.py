"""`servoloop serve` as its own process on the real tiny model: keys from the CLI, the openai client,
grpcurl, and a graceful drain on SIGTERM that lets an in-flight stream finish."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    def __init__(self, root: Path, engine: str, model_dir: Path):
        self.root = root
        self.http_port, self.grpc_port = _free_port(), _free_port()
        self.config = root / "servoloop.yaml"
        self.config.write_text(
            f"data_dir: {root / 'data'}\n"
            "gateway:\n  host: 127.0.0.1\n"
            f"  http_port: {self.http_port}\n  grpc_port: {self.grpc_port}\n  drain_timeout_s: 20\n"
            f"  models:\n    - {{name: tiny, engine: {engine}, path: '{model_dir}'}}\n")
        self.env = {**os.environ, "SERVOLOOP_CONFIG": str(self.config)}
        self.log = (root / "gateway.log").open("w")
        self.proc = subprocess.Popen([str(BIN / "servoloop"), "serve"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, (self.root / "gateway.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError("gateway did not become ready:\n" + (self.root / "gateway.log").read_text())

    def create_key(self) -> str:
        out = subprocess.run([str(BIN / "servoloop"), "keys", "create", "--tenant", "acme"], env=self.env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.log.close()


@pytest.fixture(params=["transformers", "vllm"])
def gateway_process(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path, request.param, tiny_model_dir)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


async def test_gateway_process_serves_openai_and_grpc_and_drains_on_sigterm(gateway_process: GatewayProcess) -> None:
    key = await asyncio.to_thread(gateway_process.create_key)
    base = f"http://127.0.0.1:{gateway_process.http_port}/v1"
    client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)  # a new key: reloaded within ~1 s
    for _ in range(40):
        try:
            r = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                                     max_tokens=8)
            break
        except openai.AuthenticationError:
            await asyncio.sleep(0.1)
    assert r.choices[0].message.content

    grpcurl = await asyncio.to_thread(subprocess.run, [str(BIN / "grpcurl"), "-plaintext",
                                      f"127.0.0.1:{gateway_process.grpc_port}", "list"],
                                      capture_output=True, text=True, timeout=30)
    assert "servoloop.v1.Inference" in grpcurl.stdout

    # An in-flight stream finishes even though SIGTERM arrives in the middle of it.
    stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell a story"}],
                                                  max_tokens=200, stream=True, temperature=1.0)
    first = await anext(stream.__aiter__())
    gateway_process.proc.send_signal(signal.SIGTERM)
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert first.choices[0].delta.role == "assistant"
    assert finishes[-1] in ("stop", "length")
    assert await asyncio.to_thread(gateway_process.proc.wait, 60) == 0
