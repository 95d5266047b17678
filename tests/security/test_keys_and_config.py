"""Secrets at rest and on screen: API keys only as salted hashes compared in constant time; `servoloop config
show` never prints a secret, wherever the settings tree holds one; adapters are verified before they load."""

from __future__ import annotations

import hashlib
import inspect
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gateway import auth
from gateway.auth import Authenticator, KeyStore
from gateway.limits import RateLimiter
from gateway.settings import RateLimitSettings
from schemas.artifacts import ArtifactMismatch, fetch_verified, tree_sha256
from schemas.errors import Unauthenticated
from servoloop.cli import app


def test_keys_are_stored_only_as_salted_hashes(tmp_path: Path):
    store = KeyStore(tmp_path / "keys.sqlite")
    made = [store.create("acme", ["infer"]) for _ in range(3)]
    raw = (tmp_path / "keys.sqlite").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("keys.sqlite-*"))
    with sqlite3.connect(tmp_path / "keys.sqlite") as db:
        rows = db.execute("SELECT key_id, salt, secret_hash FROM api_keys").fetchall()
        dump = "\n".join(db.iterdump())
    secrets = {auth.parse_key(key)[1] for _, key in made}
    for secret in secrets:
        assert secret.encode() not in raw and secret not in dump  # neither in the file nor in any column
        assert hashlib.sha256(secret.encode()).digest() not in raw  # not an unsalted hash either
    salts = [salt for _, salt, _ in rows]
    assert len(set(salts)) == len(salts) == 3 and all(len(s) == 16 for s in salts)  # a fresh salt per key
    by_id = {key_id: (salt, digest) for key_id, salt, digest in rows}
    for key_id, key in made:
        salt, digest = by_id[key_id]
        assert digest == hashlib.sha256(salt + auth.parse_key(key)[1].encode()).digest()


def test_keys_are_compared_in_constant_time_even_for_unknown_ids(tmp_path: Path):
    source = inspect.getsource(Authenticator.authenticate)
    assert "hmac.compare_digest(" in source and "==" not in source.replace("!=", "")
    assert "compare_digest" in inspect.getsource(auth)
    store = KeyStore(tmp_path / "keys.sqlite")
    key_id, key = store.create("acme", ["infer"])
    authn = Authenticator(store, RateLimiter(RateLimitSettings()))
    assert authn.authenticate(f"Bearer {key}").tenant == "acme"
    for bad in (key[:-1] + ("A" if key[-1] != "A" else "B"), f"sl-{key_id}-", "sl-000000000000-x", key + "x"):
        with pytest.raises(Unauthenticated):
            authn.authenticate(f"Bearer {bad}")


def test_a_tampered_adapter_is_refused_before_anything_is_loaded(tmp_path: Path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    announced = tree_sha256(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 3 + b"\x00" * 256)  # swapped weights
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactMismatch):
        fetch_verified(f"file://{adapter}", announced, cache)
    assert not any(cache.rglob("*.safetensors"))  # nothing a loader could pick up
    # The gateway side (a tampered version announced to a serving gateway stays unloaded) is
    # tests/gateway/test_hotswap.py::test_a_tampered_artifact_is_refused_and_the_serving_version_stays.


MARKS = [f"SECRETMARK{i}x" for i in range(8)]


def test_config_show_redacts_every_secret_in_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = {
        "gateway": {
            "models": [{"name": "up", "engine": "remote", "url": f"http://user:{MARKS[0]}@vllm:8000/v1",
                        "api_key": MARKS[1]}],
            "tracing": {"enabled": True, "endpoint": f"http://otel:{MARKS[2]}@collector:4318",
                        "headers": {"Authorization": f"Bearer {MARKS[3]}", "x-api-key": MARKS[4]},
                        "langfuse": {"host": "http://lf:3000", "public_key": "pk-lf", "secret_key": MARKS[5]}},
        },
        "events": {"store": {"kind": "clickhouse", "url": f"http://default:{MARKS[6]}@ch:8123",
                             "password": MARKS[7]}},
    }
    path = tmp_path / "servoloop.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["config", "show", "--config", str(path)])
    assert result.exit_code == 0, result.output
    leaked = [m for m in MARKS if m in result.output]
    assert not leaked, f"config show printed secrets {leaked}:\n{result.output}"
    shown = yaml.safe_load(result.output)
    assert shown["gateway"]["limits"]["max_output_tokens"] == 1024  # numbers named *tokens* are not secrets
    assert shown["gateway"]["models"][0]["url"].startswith("http://user:")  # where it points stays visible
