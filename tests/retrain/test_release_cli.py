"""`servoloop models card|changelog|export --format|archive|gc|retire` against a live admin API (real gateway with
the registry's and the release routes over real chDB; the CLI runs as its own process)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from feedback.dashboard.release_api import release_extension
from feedback.store import Store
from gateway.auth import KeyStore
from retrain.lineage import version_lineage
from retrain.release.records import export_records
from schemas.artifacts import tree_sha256
from tests.retrain.test_models_cli import MODEL, Live, live_registry


@pytest.fixture
async def live(store: Store, keystore: KeyStore, tmp_path: Path, tiny_lora: Path) -> AsyncIterator[Live]:
    async with live_registry(store, keystore, tmp_path, tiny_lora,
                             extensions=lambda gw: [release_extension(store, gw.auth.authenticate)]) as lv:
        yield lv


async def test_card_endpoint_and_cli_show_the_registry_and_store_the_card_beside_the_artifacts(live: Live,
                                                                                             store: Store):
    v2 = await version_lineage(store, MODEL, "v2")
    async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}) as c:
        r = await c.get(f"/admin/v1/models/{MODEL}/versions/v2/card")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
        card = r.text
        assert "# Model card: chat@v2" in card and "state **active**" in card
        assert f"| artifact sha256 | {v2['artifact_sha256']} |" in card and "| dataset sha256 | " + "d" * 64 in card
        assert "by canary-monitor: not worse after 200 samples" in card and "| samples | 200 |" in card
        assert "thumbs_up_rate = 0.55 (threshold 0.7, alert, n=6)" in card  # the monitor behind the trigger
        stored = Path(v2["adapter_path"]).parent / "_release" / "v2" / "MODEL_CARD.md"
        assert stored.read_text() == card
        j = (await c.get(f"/admin/v1/models/{MODEL}/versions/v2/card", params={"format": "json"})).json()
        assert j["markdown"] == card and j["url"] == str(stored)
        assert (await c.get(f"/admin/v1/models/{MODEL}/versions/v9/card")).status_code == 404
        bad = await c.get(f"/admin/v1/models/{MODEL}/versions/v2/card", params={"format": "pdf"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
        ch = (await c.get(f"/admin/v1/models/{MODEL}/changelog", params={"from": "v2", "to": "v3"})).json()
        assert ch["from"]["version_id"] == "v2" and ch["to"]["state"] == "candidate"
        assert (await c.get(f"/admin/v1/models/{MODEL}/changelog")).status_code == 400
        denied = await c.get(f"/admin/v1/models/{MODEL}/versions/v2/card",
                             headers={"Authorization": f"Bearer {live.infer_key}"})
        assert denied.status_code == 403

    rc, out, err = await live.cli("card", MODEL, "v2")
    assert rc == 0, err
    assert out == card
    rc, out, err = await live.cli("changelog", MODEL, "v1", "v2", "--json")
    assert rc == 0, err
    c = json.loads(out)
    assert {r["key"] for r in c["data"]} >= {"sha256", "window_start_ms", "query"}
    assert {r["key"] for r in c["lineage"]} == {"parent_version", "trigger_id"}
    rc, out, err = await live.cli("changelog", MODEL, "v1", "v9")
    assert rc == 2 and "has no version 'v9'" in err


async def test_export_format_records_figures_and_gpu_formats_are_refused(live: Live, store: Store, tmp_path: Path,
                                                                        tiny_model_dir: Path):
    rc, _, err = await live.cli("export", MODEL, "v2", "--format", "bnb-nf4", "--out", str(tmp_path / "bnb"))
    assert rc == 2 and "needs bitsandbytes on a CUDA GPU; this machine has no GPU" in err, err
    rc, _, err = await live.cli("export", MODEL, "v2", "--format", "peft", "--out", str(tmp_path / "peft"),
                                "--base", str(tiny_model_dir), "--eval-texts", "2", "--eval-pairs", "4")
    assert rc == 0, err
    assert "tokens/s" in err and "recorded at" in err
    v2 = await version_lineage(store, MODEL, "v2")
    (record,) = export_records(v2["adapter_path"], "v2")
    assert record["format"] == "peft" and record["artifact_sha256"] == v2["artifact_sha256"]
    assert record["eval_texts"] == 2 and record["eval_pairs"] == 4 and record["perplexity_delta"] == 0.0 and record["tokens_per_s"] > 0 and record["size_bytes"] > 0
    assert tree_sha256(tmp_path / "peft" / "adapter_model.safetensors") == tree_sha256(
        Path(v2["adapter_path"]) / "adapter_model.safetensors")


async def test_archive_gc_and_retire_from_the_cli(live: Live, tmp_path: Path):
    rc, _, err = await live.cli("archive", MODEL, "--to", f"file://{tmp_path / 'vault'}")
    assert rc == 0 and "archived 3 version(s)" in err, err
    manifest = json.loads((tmp_path / "vault" / "manifest.json").read_text())
    assert sorted(e["version_id"] for e in manifest["versions"]) == ["v1", "v2", "v3"]
    rc, out, err = await live.cli("gc", MODEL, "--keep", "0", "--dry-run")
    assert rc == 0, err
    assert "keep    chat@v2: active" in out and "keep    chat@v1: ancestor of active v2" in out
    assert "would delete chat@v3" in out
    v3 = await live.registry.get(MODEL, "v3")
    assert Path(v3.adapter_path).is_dir()  # dry run

    rc, _, err = await live.cli("retire", MODEL, "v2")
    assert rc == 2 and "gateways serve it: it is the active version" in err, err
    rc, _, err = await live.cli("retire", MODEL, "v1", "--reason", "superseded long ago")
    assert rc == 0 and "decommission chat@v1: decommissioned" in err, err
    assert (await live.registry.get(MODEL, "v1")).state == "decommissioned"
