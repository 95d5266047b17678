"""`servoloop redteam` against a live in-process gateway: the real HTTP front end, auth, the default guardrail
policy and a real OpenAI-protocol upstream behind the remote engine."""

from __future__ import annotations

from guardrails.redteam import load_attacks
from servoloop.commands.guard import run_redteam
from tests.gateway.conftest import RunningGateway


async def test_redteam_reports_every_attack_and_the_default_policy_stops_injections_and_leaks(
    remote_gateway: RunningGateway,
) -> None:
    summary = await run_redteam(remote_gateway.http, remote_gateway.key("redteam"), model="remote")
    assert len(summary.results) == len(load_attacks())
    assert not [r for r in summary.results if r.outcome == "error"], summary.as_dict()
    by_category = summary.by_category()
    # Injections and jailbreaks are refused at the input guard; nothing planted leaks back out.
    assert set(by_category["prompt_injection"]) == {"blocked"}, by_category
    assert set(by_category["jailbreak"]) == {"blocked"}, by_category
    assert not [r for r in summary.results if r.outcome == "leaked"], summary.as_dict()
    # The report names what got through, and only what got through.
    report = summary.as_dict()
    assert report["got_through"] == len(report["through"]) == len(summary.got_through)
    assert {t["id"] for t in report["through"]} == {r.attack.id for r in summary.got_through}
