"""Summarise a `pip-audit --format json` report into the recorded one (benchmarks/results/pip_audit.json).

    .venv/bin/pip-audit --local --format json -o /tmp/pip_audit_raw.json; python scripts/audit_report.py /tmp/pip_audit_raw.json

pip-audit asks a vulnerability service per package (PyPI's JSON API or OSV); it has no offline database. Where
neither is reachable (a machine that sees only a package index), every package comes back skipped: the report
then says so instead of "no known vulnerabilities". Exits 1 only when a vulnerability was found.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "pip_audit.json"


def main(raw_path: str, error: str = "") -> int:
    raw = json.loads(Path(raw_path).read_text()) if Path(raw_path).exists() else {"dependencies": []}
    deps = raw.get("dependencies", [])
    skipped = [d for d in deps if "skip_reason" in d]
    vulnerable = [{"name": d["name"], "version": d.get("version"), "vulns": d["vulns"]} for d in deps if d.get("vulns")]
    report = {
        "tool": "pip-audit --local --format json (vulnerability service: PyPI JSON API)",
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": len(deps), "audited": len(deps) - len(skipped), "skipped": len(skipped),
        "vulnerable_packages": vulnerable,
        "skip_reasons": sorted({d["skip_reason"].split(":")[0] for d in skipped}),
        "note": ("no package could be audited: the vulnerability service is not reachable from this machine"
                 if deps and len(skipped) == len(deps) else error),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"pip-audit: {report['audited']} of {report['packages']} packages audited, "
          f"{len(vulnerable)} vulnerable{'; ' + report['note'] if report['note'] else ''} -> {OUT}")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
