"""Exports of a registered version: PEFT as is, merged safetensors, weight-only int8; figures recorded beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from retrain.release import exports as ex
from retrain.release.records import export_records, write_export_record
from schemas.artifacts import tree_sha256
from schemas.errors import FailedPrecondition, InvalidRequest

PROMPTS = ("Who wrote Romeo and Juliet?", "What is the capital of France?", "How many legs does a spider have?")


@pytest.fixture(scope="session")
def exported(tiny_model_dir: Path, tiny_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every CPU format exported once per session and measured on a small held-out set."""
    from retrain.gate import general_texts

    root = tmp_path_factory.mktemp("exports")
    texts, pairs = general_texts(4), ex.held_out_pairs(12)
    reference = ex.reference_quality(tiny_model_dir, tiny_lora, texts, pairs)
    figures = {fmt: ex.export_and_measure(fmt, base_dir=tiny_model_dir, adapter_dir=tiny_lora, out=root / fmt,
                                          texts=texts, pairs=pairs, reference=reference, info={"format": fmt})
               for fmt in ("peft", "merged", "int8")}
    return {"root": root, "figures": figures, "reference": reference}


def test_merged_export_generates_the_same_greedy_output_as_base_plus_adapter(
        exported: dict[str, Any], tiny_model_dir: Path, tiny_lora: Path):
    root = exported["root"]
    assert (root / "merged" / "model.safetensors").is_file()
    assert not (root / "merged" / "adapter_config.json").exists()  # a plain model, not an adapter
    peft, tok = ex.load_export("peft", tiny_lora, base_dir=tiny_model_dir)
    merged, _ = ex.load_export("merged", root / "merged")
    base, _ = ex.load_export("merged", tiny_model_dir)
    for p in PROMPTS:
        assert ex.greedy(merged, tok, p) == ex.greedy(peft, tok, p)
    # the adapter changes the model: merged output differs from the plain base model on some prompt's logits
    import torch

    enc = tok("Who wrote Romeo and Juliet?", return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(merged(**enc).logits, base(**enc).logits)


def test_peft_export_is_the_registered_adapter_byte_for_byte(exported: dict[str, Any], tiny_lora: Path):
    peft = exported["root"] / "peft"
    assert (peft / "adapter_model.safetensors").read_bytes() == (tiny_lora / "adapter_model.safetensors").read_bytes()
    assert exported["figures"]["peft"].perplexity_delta == 0.0
    assert exported["figures"]["peft"].extra["needs_base_bytes"] > 0


def test_int8_export_stores_int8_weights_loads_and_generates(exported: dict[str, Any], tiny_model_dir: Path,
                                                             tiny_lora: Path):
    from safetensors import safe_open

    int8 = exported["root"] / "int8"
    with safe_open(str(int8 / ex.INT8_WEIGHTS), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert dtypes[q_proj] == "I8" and dtypes[q_proj + "_scale"] == "F32"
    model, tok = ex.load_export("int8", int8)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Int8Linear"
    assert str(model.model.layers[0].self_attn.q_proj.weight.dtype) == "torch.int8"
    peft, _ = ex.load_export("peft", tiny_lora, base_dir=tiny_model_dir)
    answers = [ex.greedy(model, tok, p) for p in PROMPTS]
    assert all(a.strip() for a in answers)
    # weight-only int8 keeps this model's greedy answers on most prompts
    assert sum(a == ex.greedy(peft, tok, p) for a, p in zip(answers, PROMPTS, strict=True)) >= 2
    f = exported["figures"]
    assert f["int8"].size_bytes < 0.5 * f["merged"].size_bytes


def test_each_export_records_size_load_time_speed_and_quality_delta(exported: dict[str, Any], tiny_lora: Path,
                                                                    tmp_path: Path):
    ref = exported["reference"]
    for fmt, f in exported["figures"].items():
        assert f.format == fmt and f.size_bytes > 0 and f.load_s > 0 and f.tokens_per_s > 0
        assert f.reference_perplexity == pytest.approx(ref.perplexity)
        assert f.perplexity_delta == pytest.approx(f.perplexity - ref.perplexity)
        assert 0.0 <= f.preference_agreement <= 1.0 and f.eval_pairs == 12 and f.eval_texts == 4
    assert abs(exported["figures"]["merged"].perplexity_delta) < 1e-3
    assert exported["figures"]["merged"].preference_agreement == 1.0
    int8 = exported["figures"]["int8"]
    assert int8.perplexity_delta != 0.0 and abs(int8.perplexity_delta) / ref.perplexity < 0.05
    # recorded beside the version's artifacts, read back by format
    adapter_path = str(tmp_path / "artifacts" / "chat" / "v1")
    for f in exported["figures"].values():
        write_export_record(adapter_path, "v1", f.as_dict())
    records = export_records(adapter_path, "v1")
    assert [r["format"] for r in records] == ["int8", "merged", "peft"]
    assert records[0]["perplexity_delta"] == pytest.approx(int8.perplexity_delta)
    assert (tmp_path / "artifacts" / "chat" / "_release" / "v1" / "exports" / "int8.json").is_file()
    assert tree_sha256(tiny_lora)  # the adapter directory itself is never written


def test_unknown_and_gpu_formats_are_refused_with_clear_codes(tmp_path: Path, tiny_model_dir: Path, tiny_lora: Path):
    with pytest.raises(InvalidRequest) as e:
        ex.check_format("gguf")
    assert "peft, merged, int8" in e.value.message
    import torch

    if not torch.cuda.is_available():  # this machine: the GPU path says so instead of pretending
        with pytest.raises(ex.ExportUnavailable) as e2:
            ex.export_version("bnb-int8", base_dir=tiny_model_dir, adapter_dir=tiny_lora, out=tmp_path / "bnb")
        assert e2.value.code == "export_format_unavailable" and "no GPU" in e2.value.message
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FailedPrecondition):
        ex.export_version("peft", base_dir=tiny_model_dir, adapter_dir=tiny_lora, out=tmp_path / "busy")
    with pytest.raises(FailedPrecondition):
        ex.load_int8(tmp_path / "busy")
