"""A multi-node job's ranks reported as one job (workers.interface.executor.combine_ranks)."""

from __future__ import annotations

import pytest

from workers.interface.executor import WorkerPhase, WorkerReport, combine_ranks

P = WorkerPhase


def _reports(*phases: WorkerPhase) -> list[WorkerReport]:
    return [
        WorkerReport(f"j.r{k}", phase, logs=f"line from {k}\n", pid=100 + k, error=f"e{k}")
        for k, phase in enumerate(phases)
    ]


@pytest.mark.parametrize(
    ("phases", "expected"),
    [
        ((P.RUNNING, P.RUNNING), P.RUNNING),
        ((P.RUNNING, P.STARTING), P.STARTING),
        ((P.STARTING, P.RUNNING), P.STARTING),
        ((P.SUCCEEDED, P.SUCCEEDED, P.SUCCEEDED), P.SUCCEEDED),
        ((P.SUCCEEDED, P.RUNNING), P.RUNNING),  # rank 0 done: wait for the others
        ((P.RUNNING, P.SUCCEEDED), P.RUNNING),
        ((P.RUNNING, P.FAILED), P.FAILED),  # one failed rank fails the gang at once
        ((P.RUNNING, P.LOST, P.FAILED), P.LOST),  # lost wins: the job is retried
        ((P.STOPPED, P.STOPPED), P.STOPPED),
        ((P.STOPPED, P.SUCCEEDED), P.STOPPED),
        ((P.STOPPED, P.RUNNING), P.RUNNING),
    ],
)
def test_phase_of_the_gang(phases: tuple[WorkerPhase, ...], expected: WorkerPhase) -> None:
    assert combine_ranks("j", _reports(*phases)).phase is expected


def test_error_names_the_rank_and_logs_are_prefixed() -> None:
    combined = combine_ranks("j", _reports(P.RUNNING, P.FAILED))
    assert combined.job_id == "j"
    assert combined.error == "rank 1: e1"
    assert combined.logs == "line from 0\n[rank 1] line from 1\n"
    assert combined.pid == 100 and combined.rank_pids == (100, 101)


def test_a_single_rank_is_its_own_report() -> None:
    (only,) = _reports(P.FAILED)
    combined = combine_ranks("j", [only])
    assert (combined.phase, combined.error, combined.logs) == (P.FAILED, "e0", only.logs)


def test_a_rank_stopped_over_its_memory_cap_makes_the_gang_not_retryable() -> None:
    ranks = _reports(P.RUNNING, P.FAILED)
    assert combine_ranks("j", ranks).retryable
    capped = WorkerReport("j.r1", P.FAILED, error="used 9.0 GiB on GPU 0", retryable=False)
    combined = combine_ranks("j", [ranks[0], capped])
    assert (combined.phase, combined.retryable) == (P.FAILED, False)
    assert combined.error == "rank 1: used 9.0 GiB on GPU 0"
