"""Model cards: one Markdown page per version, generated from the registry (never hand-edited).

`render_card` is pure: it takes a version's full lineage (`retrain.lineage.version_lineage`) and its export
records and writes what an operator or a downstream user needs to know: base model, data window and
dataset hash, recipe, eval-gate results, the grader and monitor figures recorded at promotion (evidence of
the promotion step, the monitor result behind the trigger), exports, known limitations and intended use.
`write_card` stores it beside the artifacts (`<root>/<model>/_release/<version>/MODEL_CARD.md`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from retrain.release.records import CARD_FILE, release_url, write_text

INTENDED_USE = ("Serving through the servoloop gateway for the model name it is registered under, to the tenants "
                "whose feedback it was trained on. It is a LoRA adapter tuned towards the preferences expressed in "
                "its feedback window; it is not a general-purpose or safety-certified model.")
LIMITATIONS = (
    "Trained only on the feedback of its data window: preferences outside that window, or users who did not rate, "
    "are not represented.",
    "The eval gate measures held-out preference accuracy, a judged win-rate, red-team findings and perplexity on a "
    "general prose set; it does not measure factual accuracy.",
    "Quantized exports change the weights; their measured quality delta is listed under Exports.",
)

_GATE_KEYS = ("passed", "preference_accuracy", "current_preference_accuracy", "win_rate", "safety_findings",
              "current_safety_findings", "perplexity", "current_perplexity", "perplexity_ratio", "eval_pairs",
              "judge")


def _when(ms: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if isinstance(ms, int | float) and ms else "-"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, default=str, sort_keys=True)}`"
    return "-" if value is None or value == "" else str(value)


def _table(rows: Sequence[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]


def render_card(v: dict[str, Any], exports: Sequence[dict[str, Any]] = ()) -> str:
    """The Markdown card of the version whose full lineage is `v` (`version_lineage`'s answer)."""
    lin: dict[str, Any] = v.get("lineage") or {}
    dataset: dict[str, Any] = v.get("dataset") or lin.get("dataset") or {}
    recipe = lin.get("recipe") if isinstance(lin.get("recipe"), dict) else {}
    hyper = lin.get("hyperparameters") if isinstance(lin.get("hyperparameters"), dict) else {}
    ev = lin.get("eval") if isinstance(lin.get("eval"), dict) else {}
    out = [f"# Model card: {v['model']}@{v['version_id']}", "",
           f"_Generated from the servoloop registry; state **{v['state']}** as of {_when(v.get('updated_ms'))}._", "",
           "## Model", *_table([("base model", v.get("base_model")), ("version", v["version_id"]),
                                ("state", v["state"]), ("parent version", lin.get("parent_version")),
                                ("adapter", v.get("adapter_path")), ("artifact sha256", v.get("artifact_sha256")),
                                ("registered", _when(lin.get("registered_ms"))),
                                ("registered by", lin.get("registered_by")),
                                ("promoted by", v.get("promoted_by"))]), ""]
    out += ["## Training data", *_table([
        ("dataset sha256", dataset.get("sha256")), ("snapshot", dataset.get("path")),
        ("window start", _when(dataset.get("window_start_ms"))), ("window end", _when(dataset.get("window_end_ms"))),
        ("tenant", dataset.get("tenant")), ("counts", dataset.get("counts")), ("query", dataset.get("query")),
        ("source feedback rows", (v.get("feedback") or {}).get("count")), ("trigger", v.get("trigger_id"))]), ""]
    out += ["## Recipe", *_table([("name", recipe.get("name") or hyper.get("name")),
                                  ("method", recipe.get("method") or hyper.get("method")),
                                  ("lora", recipe.get("lora") or hyper.get("lora")),
                                  *((k, hyper[k]) for k in ("learning_rate", "epochs", "batch_size", "beta",
                                                            "loss_type", "max_length", "seed") if k in hyper)]), ""]
    out.append("## Evaluation gate")
    if ev:
        out += _table([(k, ev[k]) for k in _GATE_KEYS if k in ev])
        reasons = ev.get("reasons") or []
        out += ["", "Gate reasons: " + ("; ".join(map(str, reasons)) if reasons else "none (passed)")]
    else:
        out.append("No eval-gate results recorded.")
    out += ["", "## Figures at promotion"]
    promotion = lin.get("promotion") if isinstance(lin.get("promotion"), dict) else {}
    evidence = promotion.get("evidence") if isinstance(promotion.get("evidence"), dict) else {}
    monitor = v.get("monitor_result")
    if promotion:
        out.append(f"Promoted {_when(promotion.get('ts_ms'))} by {promotion.get('by', '-')}: "
                   f"{promotion.get('reason') or '-'}.")
    if evidence:
        out += ["", "Grader and monitor evidence recorded with the promotion:", "",
                *_table(sorted(evidence.items()))]
    if monitor:
        out += ["", f"Monitor result behind the trigger: {monitor['monitor']} {monitor['metric']} = "
                    f"{_fmt(monitor['value'])} (threshold {_fmt(monitor['threshold'])}, {monitor['status']}, "
                    f"n={monitor['sample_size']})."]
    if not (promotion or evidence or monitor):
        out.append("Not promoted; no grader or monitor figures recorded.")
    out += ["", "## Exports"]
    if exports:
        out += ["| format | size (bytes) | load (s) | tokens/s | perplexity Δ | preference accuracy Δ | agreement |",
                "|---|---|---|---|---|---|---|"]
        for e in exports:
            out.append(f"| {e['format']} | {e['size_bytes']} | {_fmt(e['load_s'])} | {_fmt(e['tokens_per_s'])} | "
                       f"{e['perplexity_delta']:+.4g} | {e['preference_accuracy_delta']:+.4g} | "
                       f"{_fmt(e['preference_agreement'])} |")
    else:
        out.append("No exports recorded (`servoloop models export`).")
    out += ["", "## Intended use", INTENDED_USE, "", "## Known limitations", *(f"- {x}" for x in LIMITATIONS)]
    if v["state"] in ("rejected", "rolled_back", "decommissioned"):
        out.append(f"- This version is **{v['state']}**: do not serve it.")
    return "\n".join(out) + "\n"


def write_card(v: dict[str, Any], exports: Sequence[dict[str, Any]] = ()) -> tuple[str, str]:
    """Render the card and store it beside the artifacts; returns (url, markdown)."""
    text = render_card(v, exports)
    url = f"{release_url(v['adapter_path'], v['version_id'])}/{CARD_FILE}"
    write_text(url, text)
    return url, text
