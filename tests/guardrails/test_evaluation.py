"""The labelled evaluation set: reproducible from its generator, and the default policy meets its targets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from guardrails import default_policy_set
from guardrails.evaluation import EvalReport, evaluate, read_jsonl

DATA = Path(__file__).parents[1] / "data" / "guardrails"
SPLITS = ("dev", "heldout", "blind")


@pytest.fixture(scope="module")
def reports() -> dict[str, EvalReport]:
    chain = default_policy_set().resolve("eval", "eval").input
    return {split: evaluate(chain, read_jsonl(DATA / f"eval_{split}.jsonl")) for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS)
def test_structured_pii_and_secrets_reach_098_recall_at_098_precision(reports: dict[str, EvalReport],
                                                                      split: str) -> None:
    for name in ("pii", "secrets"):
        c = reports[split].detectors[name]
        assert c.recall >= 0.98 and c.precision >= 0.98, (split, name, c.as_dict())


@pytest.mark.parametrize("split", SPLITS)
def test_injection_recall_at_least_090_with_at_most_2_percent_false_positives(reports: dict[str, EvalReport],
                                                                            split: str) -> None:
    r = reports[split]
    assert r.detectors["injection"].recall >= 0.9, r.as_dict()["injection"]
    assert r.injection_fpr <= 0.02


def test_the_set_has_at_least_as_many_benign_texts_as_risky_ones() -> None:
    for split in SPLITS:
        rows = list(read_jsonl(DATA / f"eval_{split}.jsonl"))
        benign = sum(r["kind"] in ("benign", "tricky") for r in rows)
        assert benign >= len(rows) - benign


def test_the_committed_set_is_exactly_what_the_generator_produces(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("guardrails_eval_generate", DATA / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for split in SPLITS:
        name = f"eval_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
