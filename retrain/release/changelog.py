"""What changed between two versions, from their lineage: data, recipe, metrics (pure functions).

`changelog(a, b)` takes two lineages (`retrain.lineage.version_lineage` answers) and returns
`{"from", "to", "data", "recipe", "metrics", "lineage"}`: each section lists `{"key", "from", "to"}` for the
keys whose values differ (recipe keys flattened to dotted paths); metrics also carry the numeric `delta`.
`render_changelog` prints it as text.
"""

from __future__ import annotations

from typing import Any

DATA_KEYS = ("sha256", "path", "window_start_ms", "window_end_ms", "tenant", "query", "counts")
# gate figures worth comparing (numbers and the verdict); sample answers and timings are left out
METRIC_SKIP = frozenset({"sample_answers", "gate_timings_s", "gate_wall_s", "reasons", "safety_attacks_hit",
                         "current"})


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def _diff(a: dict[str, Any], b: dict[str, Any], keys: Any = None, *, numeric: bool = False) -> list[dict[str, Any]]:
    out = []
    for k in keys if keys is not None else sorted({*a, *b}):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        row = {"key": k, "from": x, "to": y}
        if numeric and isinstance(x, int | float) and isinstance(y, int | float) and not isinstance(x, bool) \
                and not isinstance(y, bool):
            row["delta"] = y - x
        out.append(row)
    return out


def changelog(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The differences from version `a` to version `b` (both full lineages of the same model)."""
    la, lb = a.get("lineage") or {}, b.get("lineage") or {}
    da, db = a.get("dataset") or la.get("dataset") or {}, b.get("dataset") or lb.get("dataset") or {}
    recipe_a = _flat({"recipe": la.get("recipe") or {}, "hyperparameters": la.get("hyperparameters") or {}})
    recipe_b = _flat({"recipe": lb.get("recipe") or {}, "hyperparameters": lb.get("hyperparameters") or {}})
    ea = {k: v for k, v in (la.get("eval") or {}).items() if k not in METRIC_SKIP}
    eb = {k: v for k, v in (lb.get("eval") or {}).items() if k not in METRIC_SKIP}
    lineage_keys = ("base_model", "parent_version", "trigger_id", "artifact_sha256")
    return {
        "model": b.get("model") or a.get("model"),
        "from": {"version_id": a["version_id"], "state": a.get("state")},
        "to": {"version_id": b["version_id"], "state": b.get("state")},
        "data": _diff(da, db, [k for k in DATA_KEYS if k in da or k in db]),
        "feedback_rows": {"from": (a.get("feedback") or {}).get("count"), "to": (b.get("feedback") or {}).get("count")},
        "recipe": _diff(recipe_a, recipe_b),
        "metrics": _diff(ea, eb, numeric=True),
        "lineage": _diff({k: la.get(k) for k in lineage_keys}, {k: lb.get(k) for k in lineage_keys}),
    }


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def render_changelog(c: dict[str, Any]) -> str:
    """The changelog as readable text, one line per change."""
    lines = [f"{c['model']}: {c['from']['version_id']} ({c['from']['state']}) -> "
             f"{c['to']['version_id']} ({c['to']['state']})"]
    for section in ("data", "recipe", "metrics", "lineage"):
        rows = c[section]
        lines.append(f"{section}:" + ("" if rows else " unchanged"))
        for r in rows:
            delta = f"  ({r['delta']:+.4g})" if "delta" in r else ""
            lines.append(f"  {r['key']}: {_value(r['from'])} -> {_value(r['to'])}{delta}")
    fb = c["feedback_rows"]
    if fb["from"] != fb["to"]:
        lines.append(f"source feedback rows: {_value(fb['from'])} -> {_value(fb['to'])}")
    return "\n".join(lines) + "\n"
