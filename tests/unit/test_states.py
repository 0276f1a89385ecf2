"""The transition table: every pair of states is either allowed or raises."""

from __future__ import annotations

import itertools

import pytest

from scheduler.errors import IllegalTransition
from scheduler.states import ALLOWED, TERMINAL, JobState, check_transition

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
