"""The routing table folded from model events, and the sticky canary split (pure functions)."""

from __future__ import annotations

import pytest

from gateway.canary import (
    ACTIVE,
    CANARY,
    Arm,
    ModelRouting,
    choose_arm,
    routing_from_events,
    sticky_key,
    sticky_point,
)
from schemas.events import ModelEvent


def ev(version: str, state: str, ts: int, *, model: str = "m", share: float = 0.0, path: str = "/a") -> ModelEvent:
    return ModelEvent(model=model, version_id=version, state=state, ts_ms=ts, adapter_path=path,
                      artifact_sha256="h" + version if path else "", canary_share=share)


def test_no_events_means_no_routing_the_configured_base_serves() -> None:
    assert routing_from_events([]) == {}


def test_the_latest_row_of_each_version_decides_its_state_in_any_order() -> None:
    rows = [ev("v1", "active", 20), ev("v1", "candidate", 10), ev("v1", "canary", 15, share=0.2)]
    assert routing_from_events(reversed(rows)) == {"m": ModelRouting(active=Arm("v1", "/a", "hv1"))}


def test_a_promotion_switches_before_the_old_versions_retired_row_arrives() -> None:
    rows = [ev("v1", "active", 10), ev("v2", "active", 20)]
    assert routing_from_events(rows)["m"].active == Arm("v2", "/a", "hv2")
    rows.append(ev("v1", "retired", 21))
    assert routing_from_events(rows)["m"].active == Arm("v2", "/a", "hv2")


def test_rollback_of_the_active_version_reactivates_the_previous_or_leaves_the_base() -> None:
    rows = [ev("v0", "active", 10, path=""), ev("v1", "active", 20), ev("v0", "retired", 21, path="")]
    assert routing_from_events(rows)["m"].active == Arm("v1", "/a", "hv1")
    rolled = [*rows, ev("v1", "rolled_back", 30), ev("v0", "active", 30, path="")]
    assert routing_from_events(rolled)["m"].active == Arm("v0")
    assert routing_from_events(rolled)["m"].active.adapter is None  # the base model: no adapter
    only_v1 = [ev("v1", "active", 20), ev("v1", "rolled_back", 30)]
    assert routing_from_events(only_v1) == {}


def test_canary_arm_carries_its_share_and_ends_when_rolled_back_or_promoted() -> None:
    rows = [ev("v1", "active", 10), ev("v2", "canary", 20, share=0.25)]
    assert routing_from_events(rows)["m"] == ModelRouting(Arm("v1", "/a", "hv1"), Arm("v2", "/a", "hv2"), 0.25)
    assert routing_from_events([*rows, ev("v2", "rolled_back", 30)])["m"].canary is None
    promoted = routing_from_events([*rows, ev("v2", "active", 30), ev("v1", "retired", 30)])["m"]
    assert promoted == ModelRouting(Arm("v2", "/a", "hv2"))


def test_rejected_candidates_and_zero_share_canaries_serve_nothing() -> None:
    rows = [ev("v1", "candidate", 10), ev("v1", "rejected", 11), ev("v2", "canary", 12, share=0.0)]
    assert routing_from_events(rows) == {}


def test_models_are_folded_independently_and_rows_without_ids_are_ignored() -> None:
    rows = [ev("v1", "active", 10, model="a"), ev("v9", "active", 10, model="b"), ModelEvent(state="active")]
    got = routing_from_events(rows)
    assert set(got) == {"a", "b"} and got["b"].active == Arm("v9", "/a", "hv9")


def test_ties_within_a_millisecond_follow_event_creation_order() -> None:
    first = ev("v1", "active", 10)
    second = ev("v1", "rolled_back", 10)  # created later: a larger UUIDv7
    assert routing_from_events([second, first]) == {}


def test_sticky_key_prefers_session_then_user_then_api_key() -> None:
    assert sticky_key(session="s", user="u", key_id="k") == "s:s"
    assert sticky_key(user="u", key_id="k") == "u:u"
    assert sticky_key(key_id="k") == "k:k"


def test_a_caller_always_lands_on_the_same_arm() -> None:
    for i in range(200):
        key = sticky_key(user=f"user-{i}")
        arms = {choose_arm("m", key, 0.3) for _ in range(5)}
        assert len(arms) == 1
    assert sticky_point("m", "u:x") == sticky_point("m", "u:x")
    assert 0 <= sticky_point("m", "u:x") < 1


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5, 0.9])
def test_canary_fraction_over_many_callers_matches_the_share(share: float) -> None:
    n = 10_000
    canary = sum(choose_arm("tiny", sticky_key(user=f"user-{i}"), share) == CANARY for i in range(n))
    # within four binomial standard deviations (the keys are fixed, so this is deterministic): at 0.1 that is
    # 0.012, at 0.01 0.004
    assert abs(canary / n - share) <= 4 * (share * (1 - share) / n) ** 0.5


def test_ten_thousand_users_at_a_tenth_give_a_tenth_within_a_percent() -> None:
    canary = sum(choose_arm("tiny", sticky_key(user=f"u{i}"), 0.1) == CANARY for i in range(10_000))
    assert abs(canary / 10_000 - 0.1) <= 0.01


def test_share_zero_and_one_are_exact() -> None:
    keys = [sticky_key(user=str(i)) for i in range(1000)]
    assert {choose_arm("m", k, 0.0) for k in keys} == {ACTIVE}
    assert {choose_arm("m", k, 1.0) for k in keys} == {CANARY}


def test_raising_the_share_only_moves_callers_from_active_to_canary() -> None:
    keys = [sticky_key(user=str(i)) for i in range(2000)]
    at_10 = {k for k in keys if choose_arm("m", k, 0.1) == CANARY}
    at_30 = {k for k in keys if choose_arm("m", k, 0.3) == CANARY}
    assert at_10 <= at_30


def test_the_split_is_independent_per_model() -> None:
    keys = [sticky_key(user=str(i)) for i in range(2000)]
    a = {k for k in keys if choose_arm("a", k, 0.5) == CANARY}
    b = {k for k in keys if choose_arm("b", k, 0.5) == CANARY}
    assert a != b
