"""The transition tables of jobs and deployments: every pair of states is allowed or raises."""

from __future__ import annotations

import itertools

import pytest

from scheduler.core.states import (
    ALLOWED,
    TERMINAL,
    DeploymentState,
    JobState,
    check_deployment_transition,
    check_transition,
)
from workers.interface.errors import IllegalTransition

EXPECTED_ALLOWED = {
    (JobState.PENDING, JobState.SCHEDULED),
    (JobState.PENDING, JobState.CANCELLED),
    (JobState.PENDING, JobState.FAILED),
    (JobState.SCHEDULED, JobState.RUNNING),
    (JobState.SCHEDULED, JobState.PENDING),
    (JobState.SCHEDULED, JobState.SUCCEEDED),
    (JobState.SCHEDULED, JobState.FAILED),
    (JobState.SCHEDULED, JobState.CANCELLED),
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.CANCELLED),
    (JobState.RUNNING, JobState.PREEMPTED),
    (JobState.RUNNING, JobState.PENDING),
    (JobState.PREEMPTED, JobState.PENDING),
    (JobState.PREEMPTED, JobState.CANCELLED),
    (JobState.PREEMPTED, JobState.FAILED),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, JobState)))
def test_transition_table(current: JobState, target: JobState) -> None:
    if (current, target) in EXPECTED_ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(IllegalTransition, match=f"{current} -> {target}"):
            check_transition(current, target)


def test_terminal_states_have_no_way_out() -> None:
    assert all(not ALLOWED[s] for s in TERMINAL)
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == TERMINAL


@pytest.mark.parametrize(
    ("current", "target"), list(itertools.product(DeploymentState, DeploymentState))
)
def test_deployment_transition_table(current: DeploymentState, target: DeploymentState) -> None:
    """The controller reports what it sees, so any state may follow any other; staying in one
    is not a transition (the store records it as a message update instead)."""
    if current is not target:
        check_deployment_transition(current, target)
    else:
        with pytest.raises(IllegalTransition, match=f"deployment {current} -> {target}"):
            check_deployment_transition(current, target)
