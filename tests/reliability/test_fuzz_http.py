"""Schemathesis over the gateway's own OpenAPI schema: every documented operation, valid and invalid inputs,
with an authorised key. Nothing may answer 5xx; every refusal is a 4xx JSON error with a code and a message."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.reliability.conftest import FullGateway

pytestmark = pytest.mark.reliability

# At least this many requests over all operations together. `make test` runs a bounded number on 2 cores;
# `benchmarks/chaos.py --fuzz` runs the acceptance figure (1,000 per target) and records it.
CASES = int(os.environ.get("SERVOLOOP_FUZZ_CASES", "300"))


def _check(response: requests.Response, label: str, failures: list[str]) -> None:
    if response.status_code >= 500:
        failures.append(f"{label}: {response.status_code} {response.text[:300]}")
        return
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str)
        except Exception:
            failures.append(f"{label}: {response.status_code} without a JSON error body: {response.text[:300]}")


def fuzz(doc: dict[str, Any], base_url: str, key: str, cases: int) -> tuple[Counter[str], Counter[int], list[str]]:
    """Run schemathesis (blocking, in a worker thread while the gateway serves on the test loop)."""
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations()]
    per_operation = math.ceil(cases / len(operations))
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}
    for op in operations:
        _fuzz_operation(op, per_operation, base_url, session, headers, counts, statuses, failures)
        if counts[op.label] < per_operation:  # the schema leaves nothing to vary: fuzz the query string instead
            _fuzz_query(op, per_operation - counts[op.label], base_url, session, headers, counts, statuses, failures)
    return counts, statuses, failures


def _fuzz_operation(op: Any, examples: int, base_url: str, session: requests.Session, headers: dict[str, str],
                    counts: Counter[str], statuses: Counter[int], failures: list[str]) -> None:
    strategy = st.one_of(op.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         op.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        counts[op.label] += 1
        statuses[response.status_code] += 1
        _check(response, f"{op.label} {case.as_curl_command(headers=headers)[:400]}", failures)

    run()


# Query parameters the admin routes read (they validate them by hand, so the schema does not list them).
QUERY_NAMES = ("since", "until", "step", "model", "metric", "limit", "status", "window", "version")
QUERY = st.dictionaries(st.sampled_from(QUERY_NAMES) | st.text(max_size=8),
                        st.text(max_size=40) | st.integers().map(str) | st.floats().map(str), max_size=4)


def _fuzz_query(op: Any, examples: int, base_url: str, session: requests.Session, headers: dict[str, str],
                counts: Counter[str], statuses: Counter[int], failures: list[str]) -> None:
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(params=QUERY)
    def run(params: dict[str, str]) -> None:
        response = session.request(op.method.upper(), base_url + op.path, params=params, headers=headers, timeout=30)
        counts[op.label] += 1
        statuses[response.status_code] += 1
        _check(response, f"{op.label} ?{params!r}", failures)

    run()


async def test_openapi_fuzzing_finds_no_server_error_and_every_refusal_is_a_json_4xx(full_gateway: FullGateway):
    async with httpx.AsyncClient(base_url=full_gateway.http) as c:
        doc = (await c.get("/openapi.json")).json()
    paths = set(doc["paths"])
    # The schema documents the whole surface the fuzzer must reach: inference, feedback, admin and registry.
    assert {"/v1/chat/completions", "/v1/completions", "/v1/feedback", "/v1/models", "/admin/v1/overview",
            "/admin/v1/models/{model}/versions/{version}", "/admin/v1/lineage/{inference_id}"} <= paths
    admin_key = full_gateway.key("fuzz", ("infer", "feedback", "admin"))
    counts, statuses, failures = await asyncio.to_thread(fuzz, doc, full_gateway.http, admin_key, CASES)
    print("FUZZ " + json.dumps({"target": "http_openapi", "cases": sum(counts.values()), "operations": len(counts),
                      "statuses": dict(sorted(statuses.items()))}))
    assert not failures, "\n".join(failures[:20])
    assert sum(counts.values()) >= CASES
    assert len(counts) == sum(len(v) for v in doc["paths"].values())
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
