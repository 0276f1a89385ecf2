"""The SLO guard's policy (scheduler/core/slo_guard.py), on a clock passed in."""

from __future__ import annotations

import pytest

from scheduler.core.slo_guard import (
    DeploymentLatency,
    GuardSettings,
    GuardState,
    TrainingJob,
    guard,
)

SETTINGS = GuardSettings(throttle_at=0.8, release_at=0.5, dwell_s=2.0, max_throttle_s=60, rest_s=30)
JOBS = [
    TrainingJob("near", "vision", frozenset({"n1"})),
    TrainingJob("far", "vision", frozenset({"n2"})),
    TrainingJob("gang", "nlp", frozenset({"n2", "n1"})),
]


def dep(p99_ms: float | None, nodes: frozenset[str] = frozenset({"n1"})) -> DeploymentLatency:
    return DeploymentLatency("mlp", "serving", p99_ms, slo_p99_ms=10.0, nodes=nodes)


def run(
    steps: list[tuple[float, float | None]], state: GuardState | None = None
) -> tuple[list[tuple[float, set[str], set[str]]], GuardState]:
    """(time, throttled, released) per step of (time, p99_ms)."""
    state = state or GuardState()
    seen = []
    for now, p99 in steps:
        decision, state = guard([dep(p99)], JOBS, state, SETTINGS, now)
        seen.append(
            (now, {t.job_id for t in decision.throttle}, {r.job_id for r in decision.release})
        )
    return seen, state


def test_a_p99_over_the_threshold_for_the_dwell_throttles_the_colocated_jobs_only() -> None:
    seen, state = run([(0.0, 9.0), (1.0, 9.0), (2.0, 9.0), (3.0, 9.0)])
    assert seen[0][1] == set() and seen[1][1] == set()
    assert seen[2][1] == {"near", "gang"}  # a gang is throttled when any of its nodes is shared
    assert seen[3][1] == set()  # throttled once, not again each pass
    assert set(state.throttled) == {"near", "gang"}
    assert state.throttled["near"].deployment == "mlp"


def test_one_slow_pass_does_not_throttle_and_the_dwell_restarts_after_a_dip() -> None:
    seen, _ = run([(0.0, 9.0), (1.5, 7.0), (2.5, 9.0), (4.0, 9.0), (4.5, 9.0)])
    assert all(not throttled for _, throttled, _ in seen[:4])
    assert seen[4][1] == {"near", "gang"}


def test_release_needs_the_lower_threshold_for_the_dwell() -> None:
    seen, state = run(
        [(0.0, 9.0), (2.0, 9.0), (3.0, 6.0), (6.0, 6.0), (7.0, 4.0), (8.0, 4.0), (9.0, 4.0)]
    )
    assert seen[1][1] == {"near", "gang"}
    # between the two thresholds: still hot, however long
    assert seen[2][2] == set() and seen[3][2] == set()
    assert seen[4][2] == set() and seen[5][2] == set()
    assert seen[6][2] == {"near", "gang"}
    assert state.throttled == {} and state.hot == frozenset()


def test_no_traffic_counts_as_recovered() -> None:
    seen, _ = run([(0.0, 9.0), (2.0, 9.0), (3.0, None), (5.0, None)])
    assert seen[3][2] == {"near", "gang"}


def test_a_throttle_ends_at_max_throttle_and_the_job_rests_before_the_next() -> None:
    seen, _ = run([(0.0, 9.0), (2.0, 9.0), (62.0, 9.0), (70.0, 9.0), (92.0, 9.0)])
    assert seen[1][1] == {"near", "gang"}
    assert seen[2][2] == {"near", "gang"}
    assert seen[3][1] == set()  # resting while the deployment is still hot
    assert seen[4][1] == {"near", "gang"}  # rested rest_s: throttled again


def test_expired_releases_say_so() -> None:
    state = GuardState()
    for now in (0.0, 2.0):
        _, state = guard([dep(9.0)], JOBS, state, SETTINGS, now)
    decision, _ = guard([dep(9.0)], JOBS, state, SETTINGS, 62.0)
    assert {(r.job_id, r.expired, r.throttled_s) for r in decision.release} == {
        ("near", True, 60.0),
        ("gang", True, 60.0),
    }


def test_a_job_that_ended_is_forgotten_without_a_release() -> None:
    state = GuardState()
    for now in (0.0, 2.0):
        _, state = guard([dep(9.0)], JOBS, state, SETTINGS, now)
    decision, state = guard([dep(9.0)], JOBS[1:], state, SETTINGS, 3.0)
    assert decision.release == ()
    assert set(state.throttled) == {"gang"}


def test_a_replica_moving_away_releases_the_jobs_it_no_longer_shares_a_node_with() -> None:
    state = GuardState()
    for now in (0.0, 2.0):
        _, state = guard([dep(9.0)], JOBS, state, SETTINGS, now)
    decision, state = guard([dep(9.0, frozenset({"n3"}))], JOBS, state, SETTINGS, 3.0)
    assert {r.job_id for r in decision.release} == {"near", "gang"}
    assert not any(r.expired for r in decision.release)


def test_thresholds_must_make_sense() -> None:
    with pytest.raises(ValueError, match="release_at"):
        GuardSettings(throttle_at=0.5, release_at=0.8)
    with pytest.raises(ValueError, match="max_throttle_s"):
        GuardSettings(max_throttle_s=0)
