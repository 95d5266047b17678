"""Rebuilding a version from its lineage: the recorded recipe on the recorded dataset snapshot, then the gate.

`reproduce` checks that the snapshot still hashes as recorded (`lineage.dataset.sha256`), trains with the
recorded recipe (`lineage.hyperparameters`, the full recipe as JSON), evaluates the new adapter exactly as the
worker did (`retrain.gate.evaluate`, the recipe's gate thresholds, the snapshot's eval split, against the
parent's adapter when given, else the base model) and compares the candidate's figures with the recorded ones
(`lineage.eval`) within `TOLERANCES`:

    preference_accuracy, logp_accuracy   ± 0.05 (absolute)
    win_rate                             ± 0.10 (absolute; sampled answers judged)
    perplexity                           ± 5 % (relative)
    safety_findings                      ± 1 (absolute; red-team findings)

Training on CPU with the recorded seed is deterministic here, so a faithful lineage reproduces the figures
(and usually the adapter bytes) exactly; the tolerances absorb thread-count and library-version noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas.artifacts import ArtifactMismatch, tree_sha256
from schemas.errors import FailedPrecondition

WEIGHTS = "adapter_model.safetensors"
# metric -> (kind, tolerance): kind "abs" compares |a - b|, "rel" compares |a - b| / |a|
TOLERANCES: dict[str, tuple[str, float]] = {
    "preference_accuracy": ("abs", 0.05),
    "logp_accuracy": ("abs", 0.05),
    "win_rate": ("abs", 0.10),
    "perplexity": ("rel", 0.05),
    "safety_findings": ("abs", 1.0),
}


class NotReproducible(FailedPrecondition):
    """The lineage lacks what a rebuild needs (recipe, dataset snapshot, eval figures)."""

    code = "not_reproducible"


@dataclass(frozen=True, slots=True)
class MetricCheck:
    metric: str
    original: float
    reproduced: float
    difference: float
    kind: str
    tolerance: float
    ok: bool


@dataclass(frozen=True, slots=True)
class Reproduction:
    model: str
    version_id: str
    within_tolerance: bool
    checks: tuple[MetricCheck, ...]
    original_sha256: str  # of the weights file
    reproduced_sha256: str
    adapter_dir: str
    dataset_sha256: str
    wall_s: float
    figures: dict[str, Any]

    @property
    def identical_adapter(self) -> bool:
        return bool(self.original_sha256) and self.original_sha256 == self.reproduced_sha256

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"identical_adapter": self.identical_adapter}


def compare(original: dict[str, Any], reproduced: dict[str, Any],
            tolerances: dict[str, tuple[str, float]] | None = None) -> list[MetricCheck]:
    """One check per tolerated metric present (as a number) in both figure sets. Pure."""
    out = []
    for metric, (kind, tol) in (tolerances or TOLERANCES).items():
        a, b = original.get(metric), reproduced.get(metric)
        if not isinstance(a, int | float) or not isinstance(b, int | float) or isinstance(a, bool):
            continue
        diff = abs(float(b) - float(a))
        if kind == "rel":
            diff = diff / abs(float(a)) if a else (0.0 if b == a else math.inf)
        out.append(MetricCheck(metric, float(a), float(b), diff, kind, tol, diff <= tol + 1e-12))
    return out


def recorded_recipe(lineage: dict[str, Any]) -> Any:
    """The Recipe a version was trained with; raises NotReproducible when the lineage has none."""
    from retrain.recipes import parse_recipe

    hyper = lineage.get("hyperparameters")
    if not isinstance(hyper, dict) or "method" not in hyper:
        raise NotReproducible("the lineage records no full recipe ('hyperparameters'): it cannot be re-run")
    return parse_recipe(hyper, source="lineage.hyperparameters")


def reproduce(v: dict[str, Any], *, base_dir: Path, work_dir: Path, current_dir: Path | None = None,
              original_dir: Path | None = None, tolerances: dict[str, tuple[str, float]] | None = None,
              progress: bool = False) -> Reproduction:
    """Re-run the recipe of version `v` (a `version_lineage` answer) on its snapshot and compare eval figures.

    Raises NotReproducible (no recipe, no snapshot, no recorded eval figures), ArtifactMismatch (the snapshot
    changed since). `original_dir`: the registered adapter, to compare weights byte for byte. Blocking and
    CPU-heavy: a full training run plus the gate.
    """
    from retrain.datasets import DatasetSnapshot
    from retrain.gate import evaluate
    from retrain.train import train

    t0 = time.monotonic()
    lineage = v.get("lineage") or {}
    recipe = recorded_recipe(lineage)
    dataset = lineage.get("dataset") if isinstance(lineage.get("dataset"), dict) else {}
    if not dataset.get("path"):
        raise NotReproducible("the lineage records no dataset snapshot path")
    original_eval = lineage.get("eval") if isinstance(lineage.get("eval"), dict) else {}
    if not original_eval:
        raise NotReproducible("the lineage records no eval figures to compare with")
    try:
        snapshot = DatasetSnapshot.load(dataset["path"])
    except FailedPrecondition as e:
        raise NotReproducible(f"the recorded snapshot is gone: {e.message}") from None
    if dataset.get("sha256") and snapshot.sha256 != dataset["sha256"]:
        raise ArtifactMismatch(f"snapshot {dataset['path']} now hashes to {snapshot.sha256[:12]}…, "
                               f"recorded {str(dataset['sha256'])[:12]}…")
    result = train(recipe, snapshot.path, base_dir, Path(work_dir), progress=progress)
    try:
        prompts = [e["prompt"] for e in snapshot.sft("eval")]
    except (OSError, FileNotFoundError):
        prompts = []
    gate = evaluate(base_dir=base_dir, candidate_dir=result.adapter_dir, eval_pairs=snapshot.pairs("eval"),
                    thresholds=recipe.gate, beta=recipe.beta, current_dir=current_dir, max_length=recipe.max_length,
                    seed=recipe.seed, prompts=prompts)
    figures = gate.as_dict()
    checks = compare(original_eval, figures, tolerances)
    if not checks:
        raise NotReproducible("no recorded eval figure can be compared (expected some of: "
                              f"{', '.join(tolerances or TOLERANCES)})")
    return Reproduction(
        model=v["model"], version_id=v["version_id"], within_tolerance=all(c.ok for c in checks),
        checks=tuple(checks), original_sha256=_weights_sha(original_dir) if original_dir else "",
        reproduced_sha256=_weights_sha(result.adapter_dir), adapter_dir=str(result.adapter_dir),
        dataset_sha256=snapshot.sha256, wall_s=round(time.monotonic() - t0, 2),
        figures={k: val for k, val in figures.items() if k != "sample_answers"})


def _weights_sha(adapter_dir: Path) -> str:
    """sha256 of the adapter's weights file (the directory also holds a training summary with timings)."""
    path = Path(adapter_dir) / WEIGHTS
    return tree_sha256(path) if path.is_file() else ""


def render_reproduction(r: Reproduction) -> str:
    lines = [f"{r.model}@{r.version_id}: " + ("reproduced within tolerance" if r.within_tolerance
                                               else "NOT reproduced within tolerance") + f" ({r.wall_s:.1f} s)"]
    for c in r.checks:
        unit = "%" if c.kind == "rel" else ""
        shown = c.difference * 100 if c.kind == "rel" else c.difference
        tol = c.tolerance * 100 if c.kind == "rel" else c.tolerance
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.metric}: {c.original:.4g} -> {c.reproduced:.4g} "
                     f"(diff {shown:.3g}{unit}, tolerance {tol:.3g}{unit})")
    lines.append(f"  adapter weights: {'identical bytes' if r.identical_adapter else 'not byte-identical'} "
                 f"({r.reproduced_sha256[:12]}… vs {r.original_sha256[:12] or '-'}…) at {r.adapter_dir}")
    return "\n".join(lines) + "\n"
