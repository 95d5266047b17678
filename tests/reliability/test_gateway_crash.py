"""A gateway SIGKILLed under load while its broker is down: the events it had accepted wait in its spool and
arrive after its restart (each exactly once); clients see errors only for the requests in flight at the kill
(and connection refusals while no gateway listens), which are counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.chaos import ChaosPlan, run_gateway_crash
from feedback.broker import EmbeddedBroker
from tests.feedback.conftest import local_s3, s3_broker  # noqa: F401

pytestmark = pytest.mark.reliability

PLAN = ChaosPlan(crash_duration_s=16, rate_per_s=4)  # the kill at 8 s, then the restart: the spool holds ~30 events


async def test_a_killed_gateway_delivers_its_spool_after_restart_and_only_in_flight_requests_fail(
        s3_broker: EmbeddedBroker, tiny_model_dir: Path, tmp_path: Path):  # noqa: F811
    fig = await run_gateway_crash(PLAN, broker=s3_broker, model_dir=tiny_model_dir, work=tmp_path)
    report = json.dumps(fig.__dict__)
    print(report)
    assert fig.accepted_before_kill > 0, report  # the spool held accepted events when the gateway died
    assert fig.errors_otherwise == 0, report
    assert fig.requests_accepted + fig.errors_in_flight_at_kill + fig.refused_while_down == fig.requests_sent, report
    assert (fig.inference_rows_missing, fig.inference_rows_duplicated) == (0, 0), report
