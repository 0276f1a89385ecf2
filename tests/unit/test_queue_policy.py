"""The queue policy: ordering, quotas (borrowing, reclaim), fair share, aging, LAS, backfill.

Pure: no Ray, no clock. ``plan`` is called with hand-made queues; the
property test at the end places each plan with the real placement
(``place_plan``) and checks that backfill never delays the head's reserved start.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scheduler.core.model import (
    ClusterSnapshot,
    Demand,
    Holding,
    PlacementPolicy,
    QueuedJob,
    QueuePlan,
    QueuePolicy,
    RunningJob,
)
from scheduler.core.queue_policy import RESERVED_PREFIX, place_plan, plan
from tests.unit.placement_factories import GIB, _node, uuid

FIFO = QueuePolicy(mode="fifo", aging_s_per_priority=None, min_run_s=0.0)


def q(
    job_id: str, gpus: int = 1, *, at: float = 0.0, team: str = "a", prio: int = 0, **kw: Any
) -> QueuedJob:
    return QueuedJob(job_id, team, prio, gpus, submitted_at=at, **kw)


def r(
    job_id: str,
    node: str,
    gpus: int = 1,
    *,
    team: str = "a",
    prio: int = 0,
    at: float = 0.0,
    **kw: Any,
) -> RunningJob:
    nodes = kw.pop("nodes", (node,))
    return RunningJob(job_id, team, prio, gpus, nodes, started_at=at, **kw)


def waiting(p: QueuePlan) -> set[str]:
    return set(p.reasons)


# --------------------------------------------------------------------------- order and rank


def test_everything_that_fits_starts_in_submit_order() -> None:
    pending = [q("late", at=3.0), q("early", at=1.0), q("mid", at=2.0)]
    p = plan(pending, [], {"n1": 8}, FIFO, now=10.0)
    assert p.order == ("early", "mid", "late")
    assert p.preempt == () and dict(p.reasons) == {}


def test_higher_priority_goes_first_and_the_rest_says_why() -> None:
    pending = [q("low", 4, at=0.0), q("high", 4, at=5.0, prio=5), q("low2", 4, at=1.0)]
    p = plan(pending, [r("busy", "n1", 4)], {"n1": 8}, FIFO, now=10.0)
    assert p.order == ("high",)
    assert waiting(p) == {"low", "low2"}
    assert p.reasons["low"].startswith("capacity: needs 4 GPUs on one node")


def test_strict_fifo_lets_nothing_pass_the_head() -> None:
    policy = QueuePolicy(mode="fifo", backfill=False, aging_s_per_priority=None)
    pending = [q("big", 8, at=0.0), q("small", 1, at=1.0)]
    p = plan(pending, [r("busy", "n1", 4)], {"n1": 8}, policy, now=10.0)
    assert p.order == ()
    assert p.reservation is not None and p.reservation.job_id == "big"
    assert p.reasons["small"] == "priority: waits behind big (strict order, no backfill)"


def test_sjf_orders_by_estimate_and_puts_unknown_last() -> None:
    policy = QueuePolicy(mode="sjf", aging_s_per_priority=None)
    pending = [
        q("unknown", at=0.0),
        q("long", at=1.0, est_duration_s=500.0),
        q("short", at=2.0, est_duration_s=5.0),
    ]
    assert plan(pending, [], {"n1": 8}, policy, now=3.0).order == ("short", "long", "unknown")


def test_ranked_lists_every_pending_job_by_rank_those_that_wait_too() -> None:
    policy = QueuePolicy(mode="las", aging_s_per_priority=None)
    pending = [
        q("long", 4, at=0.0, est_duration_s=500.0),
        q("short", 4, at=1.0, est_duration_s=5.0),
        q("urgent", 4, at=2.0, prio=1),
    ]
    p = plan(pending, [r("busy", "n1", 8)], {"n1": 8}, policy, now=3.0)
    assert p.order == ()  # nothing starts: the listing still has the policy's order
    assert p.ranked == ("urgent", "short", "long")


def test_a_job_that_can_never_fit_does_not_block_the_queue() -> None:
    pending = [q("huge", 16, at=0.0), q("small", 2, at=1.0)]
    p = plan(pending, [], {"n1": 8, "n2": 8}, FIFO, now=5.0)
    assert p.order == ("small",)
    assert "too few such nodes" in p.reasons["huge"]
    assert p.reservation is None


def test_a_gang_needs_its_gpus_on_distinct_nodes() -> None:
    pending = [q("gang", 4, nodes=2, at=0.0)]
    one_node = plan(pending, [], {"n1": 8}, FIFO, now=1.0)
    two_nodes = plan(pending, [], {"n1": 8, "n2": 4}, FIFO, now=1.0)
    assert one_node.order == () and "each of 2 nodes" in one_node.reasons["gang"]
    assert two_nodes.order == ("gang",)


def test_duplicate_pending_ids_and_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan([q("x"), q("x")], [], {"n1": 1}, FIFO, now=0.0)
    with pytest.raises(ValueError, match="mode"):
        QueuePolicy(mode="lifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ascend"):
        QueuePolicy(las_thresholds_gpu_s=(10.0, 5.0))
    with pytest.raises(ValueError, match="max_est_error"):
        QueuePolicy(max_est_error=-0.1)


# --------------------------------------------------------------------------- aging


def test_aging_lets_a_low_priority_job_catch_up() -> None:
    pending = [q("old-low", 8, at=0.0, prio=-2), q("new-high", 8, at=7000.0, prio=0)]
    no_aging = QueuePolicy(aging_s_per_priority=None)
    aging = QueuePolicy(aging_s_per_priority=3600.0)
    nodes = {"n1": 8}
    # Without aging priority wins for ever; with one step per hour, two hours of
    # waiting lift priority -2 to 0, and the earlier submit breaks the tie.
    assert plan(pending, [], nodes, no_aging, now=7300.0).order == ("new-high",)
    assert plan(pending, [], nodes, aging, now=7300.0).order == ("old-low",)
    assert plan(pending, [], nodes, aging, now=7100.0).order == ("new-high",)


def test_aging_ends_in_preemption_and_the_plan_says_when() -> None:
    policy = QueuePolicy(aging_s_per_priority=3600.0, min_run_s=0.0)
    running = [r("runner", "n1", 8, at=0.0)]
    pending = [q("starved", 8, at=0.0, prio=-1)]
    early = plan(pending, running, {"n1": 8}, policy, now=1000.0)
    assert early.preempt == () and early.order == ()
    # Priority -1 reaches 0 after one hour (a tie, no preemption) and 1 after two.
    assert early.next_change_at == pytest.approx(7200.0)
    late = plan(pending, running, {"n1": 8}, policy, now=7200.0)
    assert late.preempt == ("runner",) and late.order == ("starved",)


# --------------------------------------------------------------------------- LAS and preemption


LAS = QueuePolicy(
    mode="las", las_thresholds_gpu_s=(1000.0,), aging_s_per_priority=None, min_run_s=0.0
)


def test_las_preempts_a_job_in_a_lower_queue_not_one_in_the_same() -> None:
    running = [r("old", "n1", 1, at=0.0), r("young", "n2", 1, at=900.0)]
    pending = [q("new", 1, at=950.0)]
    nodes = {"n1": 1, "n2": 1}
    # At t=1200 "old" has attained 1,200 GPU-s (queue 1), "young" 300 (queue 0).
    p = plan(pending, running, nodes, LAS, now=1200.0)
    assert p.preempt == ("old",) and p.order == ("new",)
    # Before "old" crosses the threshold nobody is preempted; the plan names the crossing.
    before = plan(pending, running, nodes, LAS, now=960.0)
    assert before.preempt == ()
    assert before.next_change_at == pytest.approx(1000.0)


def test_attained_service_counts_gpus_times_seconds() -> None:
    running = [r("wide", "n1", 4, at=0.0)]  # 4 GPUs x 300 s = 1,200 GPU-s: queue 1
    p = plan([q("new", 4, at=100.0)], running, {"n1": 4}, LAS, now=300.0)
    assert p.preempt == ("wide",)


SRPT = QueuePolicy(
    mode="srpt", las_thresholds_gpu_s=(1000.0, 4000.0), aging_s_per_priority=None, min_run_s=0.0
)


def test_srpt_preempts_the_job_furthest_from_its_end_for_a_shorter_one() -> None:
    # Remaining GPU-s at t=100: "near" 1 x 400 (queue 0), "far" 1 x 4,900 (queue 2).
    running = [r("near", "n1", 1, est_end=500.0), r("far", "n2", 1, est_end=5000.0)]
    p = plan(
        [q("new", 1, at=100.0, est_duration_s=800.0)], running, {"n1": 1, "n2": 1}, SRPT, 100.0
    )
    assert p.preempt == ("far",) and p.order == ("new",)
    # A job in the same bucket as the running one (both queue 2) does not preempt it.
    same = plan([q("new", 1, at=100.0, est_duration_s=4500.0)], running[1:], {"n2": 1}, SRPT, 100.0)
    assert same.preempt == ()


def test_srpt_counts_remaining_gpu_seconds_and_ranks_unknown_last() -> None:
    # 4 GPUs x 300 s = 1,200 GPU-s (queue 1) outranks 1 GPU x 4,000 s (queue 2).
    pending = [
        q("long", 1, at=0.0, est_duration_s=4000.0),
        q("wide", 4, at=1.0, est_duration_s=300.0),
    ]
    pending.append(q("unknown", 1, at=2.0))
    p = plan(pending, [], {"n1": 4}, SRPT, 10.0)
    assert p.order == ("wide",) and list(p.reasons) == ["long", "unknown"]
    # A running job without an estimate is in the last queue: any estimated job outranks it.
    running = [r("blind", "n1", 1)]
    assert plan([q("new", 1, est_duration_s=9e9)], running, {"n1": 1}, SRPT, 10.0).preempt == ()
    assert plan([q("new", 1, est_duration_s=3000.0)], running, {"n1": 1}, SRPT, 10.0).preempt == (
        "blind",
    )


def test_a_job_is_protected_for_min_run_s_after_it_starts() -> None:
    policy = QueuePolicy(
        mode="las", las_thresholds_gpu_s=(10.0,), aging_s_per_priority=None, min_run_s=600.0
    )
    running = [r("restarted", "n1", 1, at=1000.0, attained_gpu_s=5000.0)]
    pending = [q("new", 1, at=1100.0)]
    p = plan(pending, running, {"n1": 1}, policy, now=1200.0)
    assert p.preempt == () and p.next_change_at == pytest.approx(1600.0)
    assert plan(pending, running, {"n1": 1}, policy, now=1600.0).preempt == ("restarted",)


def test_a_non_preemptible_job_is_never_a_victim() -> None:
    running = [r("stopping", "n1", 1, at=0.0, preemptible=False)]
    p = plan([q("new", 1, at=5000.0)], running, {"n1": 1}, LAS, now=5000.0)
    assert p.preempt == () and p.next_change_at is None


def test_a_job_preempts_on_the_node_that_costs_the_fewest_gpus() -> None:
    running = [
        r("n1-wide", "n1", 6, at=0.0),
        r("n2-a", "n2", 2, at=0.0),
        r("n2-b", "n2", 2, at=0.0),
    ]
    nodes = {"n1": 8, "n2": 8}
    # n2 has 4 GPUs free: no preemption needed.
    p = plan([q("four", 4, at=5000.0)], running, nodes, LAS, now=5000.0)
    assert p.order == ("four",) and p.preempt == ()
    # With n2 full, n2 costs 4 GPUs (two 2-GPU jobs), n1 6 (its one 6-GPU job).
    full = [*running, r("n2-c", "n2", 4, at=0.0)]
    p = plan([q("four", 4, at=5000.0)], full, nodes, LAS, now=5000.0)
    assert p.order == ("four",)
    assert p.preempt == ("n2-a", "n2-b")
    assert p.victims_of == {"four": ("n2-a", "n2-b")}


def test_no_preemption_when_disabled() -> None:
    policy = QueuePolicy(mode="las", las_thresholds_gpu_s=(1.0,), preemption=False, min_run_s=0.0)
    p = plan([q("new", 1, at=5.0)], [r("old", "n1", 1)], {"n1": 1}, policy, now=5000.0)
    assert p.preempt == () and p.order == ()


# --------------------------------------------------------------------------- quotas and fair share


def quota_policy(**kw: Any) -> QueuePolicy:
    base: dict[str, Any] = {
        "quotas": {"a": 8, "b": 8},
        "aging_s_per_priority": None,
        "min_run_s": 0.0,
    }
    base.update(kw)
    return QueuePolicy(**base)


def test_idle_quota_is_lent_to_another_team() -> None:
    running = [r("a1", "n1", 8, team="a")]
    p = plan([q("a2", 8, team="a", at=1.0)], running, {"n1": 8, "n2": 8}, quota_policy(), now=2.0)
    assert p.order == ("a2",)  # beyond a's quota, on b's idle GPUs


def test_a_borrower_waits_when_nothing_is_idle_and_says_quota() -> None:
    running = [r("a1", "n1", 8, team="a"), r("b1", "n2", 8, team="b")]
    p = plan([q("a2", 1, team="a", at=1.0)], running, {"n1": 8, "n2": 8}, quota_policy(), now=2.0)
    assert p.order == () and p.preempt == ()
    assert p.reasons["a2"].startswith("quota: a holds 8 of 8 GPUs")


def test_a_team_within_quota_reclaims_borrowed_gpus_by_preemption() -> None:
    running = [
        r("a-own", "n1", 8, team="a", at=0.0),
        r("a-borrowed", "n2", 4, team="a", at=10.0),
        r("a-borrowed2", "n2", 4, team="a", at=20.0),
    ]
    # b's job has lower priority than a's, yet b is within its quota: reclaim anyway.
    pending = [q("b1", 4, team="b", at=30.0, prio=-5)]
    p = plan(pending, running, {"n1": 8, "n2": 8}, quota_policy(), now=40.0)
    assert p.order == ("b1",)
    assert len(p.preempt) == 1 and p.preempt[0] in {"a-borrowed", "a-borrowed2"}
    # The most recently started borrowed job goes: the least work lost.
    assert p.preempt == ("a-borrowed2",)


def test_reclaim_respects_min_run_s() -> None:
    running = [
        r("a-own", "n1", 8, team="a", at=20.0),
        r("a-borrowed", "n2", 8, team="a", at=35.0),
    ]
    policy = quota_policy(min_run_s=100.0)
    pending = [q("b1", 4, team="b", at=30.0)]
    p = plan(pending, running, {"n1": 8, "n2": 8}, policy, now=40.0)
    assert p.preempt == () and p.next_change_at == pytest.approx(120.0)
    assert plan(pending, running, {"n1": 8, "n2": 8}, policy, now=140.0).preempt == ("a-borrowed",)


def test_reclaim_takes_a_team_down_to_its_quota_not_below() -> None:
    running = [r(f"a{i}", "n1", 2, team="a", at=float(i)) for i in range(4)]  # a holds 8 of 4
    running.append(r("a-other", "n2", 4, team="a", at=0.0))  # 12 of 4 in all
    pending = [q("b1", 8, team="b", at=30.0)]
    policy = quota_policy(quotas={"a": 4, "b": 8})
    p = plan(pending, running, {"n1": 8, "n2": 4}, policy, now=40.0)
    assert p.order == ("b1",) and len(p.preempt) == 4  # n1 emptied: a keeps its 4 on n2
    p = plan(pending, running, {"n1": 8, "n2": 4}, quota_policy(quotas={"a": 8, "b": 8}), now=40.0)
    assert p.preempt == () and p.order == ()  # a may lose only 4: not enough room on n1


def test_a_team_over_quota_is_not_preempted_below_it_nor_by_a_borrower() -> None:
    running = [r("a-own", "n1", 8, team="a"), r("b-own", "n2", 8, team="b")]
    # c has no quota: it borrows everything, so it cannot reclaim anything.
    pending = [q("c1", 1, team="c", at=1.0, prio=10)]
    p = plan(pending, running, {"n1": 8, "n2": 8}, quota_policy(), now=50.0)
    assert p.preempt == () and p.order == ()


def test_within_quota_goes_before_borrowing_at_the_same_rank() -> None:
    running = [r("a-own", "n1", 8, team="a")]
    pending = [q("a-more", 4, team="a", at=0.0), q("b-first", 4, team="b", at=5.0)]
    p = plan(pending, running, {"n1": 8, "n2": 4}, quota_policy(), now=10.0)
    assert p.order == ("b-first",)


@pytest.mark.parametrize(("weight_a", "weight_b", "expect_a"), [(1.0, 1.0, 4), (3.0, 1.0, 6)])
def test_fair_share_splits_gpus_by_weight(weight_a: float, weight_b: float, expect_a: int) -> None:
    policy = QueuePolicy(weights={"a": weight_a, "b": weight_b}, aging_s_per_priority=None)
    # a submitted everything first: without fair share it would take all 8 GPUs.
    pending = [q(f"a{i}", team="a", at=float(i)) for i in range(10)]
    pending += [q(f"b{i}", team="b", at=100.0 + i) for i in range(10)]
    p = plan(pending, [], {"n1": 8}, policy, now=200.0)
    started = p.order
    assert len(started) == 8
    assert sum(j.startswith("a") for j in started) == expect_a


def test_fair_share_counts_the_gpus_a_team_already_holds() -> None:
    policy = QueuePolicy(aging_s_per_priority=None)
    running = [r("a-old", "n1", 4, team="a")]
    pending = [q("a1", 1, team="a", at=0.0), q("b1", 1, team="b", at=9.0)]
    assert plan(pending, running, {"n1": 5}, policy, now=10.0).order == ("b1",)


# --------------------------------------------------------------------------- backfill


def test_backfill_short_jobs_yes_long_jobs_no() -> None:
    policy = QueuePolicy(mode="fifo", aging_s_per_priority=None)
    running = [r("busy", "n1", 4, est_end=100.0)]
    pending = [
        q("head", 8, at=0.0, est_duration_s=50.0),
        q("short", 2, at=1.0, est_duration_s=80.0),  # ends at 90 <= 100
        q("long", 2, at=2.0, est_duration_s=500.0),
        q("unknown", 1, at=3.0),
    ]
    p = plan(pending, running, {"n1": 8}, policy, now=10.0)
    assert p.order == ("short",)
    assert p.reservation is not None
    assert (p.reservation.job_id, p.reservation.start_at) == ("head", 100.0)
    assert "head of the queue, reserved to start at t=100 on n1" in p.reasons["head"]
    assert p.reasons["long"].startswith("reservation: starting now would delay head")
    assert p.reasons["unknown"].startswith("reservation:")


def test_the_reserved_start_names_nodes_by_their_labels() -> None:
    policy = QueuePolicy(mode="fifo", aging_s_per_priority=None)
    running = [r("busy", "raylet-7f3a", 4, est_end=100.0)]
    p = plan(
        [q("head", 8, at=0.0)], running, {"raylet-7f3a": 8}, policy, 10.0, {"raylet-7f3a": "gpu-a"}
    )
    assert p.reasons["head"].endswith("reserved to start at t=100 on gpu-a")


def test_backfill_may_use_the_spare_gpus_and_other_nodes() -> None:
    policy = QueuePolicy(mode="fifo", aging_s_per_priority=None)
    running = [r("busy", "n1", 6, est_end=100.0), r("other", "n2", 7, est_end=1000.0)]
    pending = [
        q("head", 5, at=0.0),
        q("long1", 1, at=1.0),
        q("long2", 1, at=2.0),
        q("long3", 1, at=3.0),
    ]
    p = plan(pending, running, {"n1": 8, "n2": 8}, policy, now=10.0)
    assert p.reservation is not None and p.reservation.node_ids == ("n1",)
    # At t=100 n1 has 8 free, the head needs 5: 3 spare, 2 of them free now; n2 has 1 free.
    assert p.reservation.spare_gpus == {"n1": 3}
    assert len(p.order) == 3 and set(p.order) == {"long1", "long2", "long3"}
    assert p.keep_off_reservation == frozenset(p.order)


def test_without_estimates_the_reserved_node_drains() -> None:
    policy = QueuePolicy(mode="fifo", aging_s_per_priority=None)
    running = [r("busy", "n1", 4)]
    p = plan([q("head", 8, at=0.0), q("small", 1, at=1.0)], running, {"n1": 8}, policy, now=5.0)
    assert p.reservation is not None and math.isinf(p.reservation.start_at)
    assert p.order == ()
    assert "unknown time" in p.reasons["head"]


def test_place_plan_keeps_long_backfill_off_the_reserved_gpus() -> None:
    policy = QueuePolicy(mode="fifo", aging_s_per_priority=None)
    running = [r("ending", "n1", 4, est_end=100.0), r("staying", "n2", 2, est_end=1000.0)]
    p = plan(
        [q("head", 8, at=0.0), q("long", 1, at=1.0)], running, {"n1": 8, "n2": 8}, policy, now=5.0
    )
    assert p.reservation is not None and p.reservation.node_ids == ("n1",)
    assert p.order == ("long",) and "long" in p.keep_off_reservation
    snapshot = snapshot_of({"n1": 8, "n2": 8}, running)
    # Packing alone would pick n1 (fewer GPUs left free); the reservation forbids it.
    (decision,) = place_plan(snapshot, p, {"long": demand("long", 1)}, PlacementPolicy())
    assert [pl.node_id for pl in decision.placement] == ["n2"]


# --------------------------------------------------------------------------- property


def demand(job_id: str, gpus: int, nodes: int = 1) -> Demand:
    return Demand(
        job_id, gpus=gpus, gpu_memory_bytes=8 * GIB, cpus=1.0, memory_bytes=GIB, nodes=nodes
    )


def snapshot_of(node_gpus: dict[str, int], running: list[RunningJob]) -> ClusterSnapshot:
    """Nodes of ``node_gpus`` with each running job on the lowest free GPU indices."""
    nodes = tuple(_node(n, gpus=g) for n, g in node_gpus.items())
    used = {n: 0 for n in node_gpus}
    holdings = []
    for job in running:
        for n in job.node_ids:
            ids = tuple(uuid(n, used[n] + i) for i in range(job.gpus))
            used[n] += job.gpus
            holdings.append(Holding(job.job_id, n, ids, 8 * GIB, 1.0, GIB))
    return ClusterSnapshot(nodes, tuple(holdings))


@st.composite
def queues(
    draw: st.DrawFn,
) -> tuple[dict[str, int], list[RunningJob], list[QueuedJob], QueuePolicy, float]:
    now = 1000.0
    node_gpus = {f"n{i}": draw(st.sampled_from([4, 8, 8])) for i in range(draw(st.integers(1, 4)))}
    free = dict(node_gpus)
    running: list[RunningJob] = []
    for i in range(draw(st.integers(0, 10))):
        node = draw(st.sampled_from(sorted(node_gpus)))
        if free[node] == 0:
            continue
        gpus = draw(st.integers(1, free[node]))
        free[node] -= gpus
        est_end = draw(st.one_of(st.none(), st.floats(900.0, 3000.0)))
        started = draw(st.floats(0.0, now))
        running.append(
            RunningJob(
                f"r{i}",
                "t",
                draw(st.integers(-1, 1)),
                gpus,
                (node,),
                started,
                attained_gpu_s=draw(st.floats(0.0, 5000.0)),
                est_end=est_end,
            )
        )
    pending = [
        QueuedJob(
            f"p{i}",
            "t",
            draw(st.integers(-1, 1)),
            draw(st.sampled_from([1, 1, 2, 4, 8])),
            submitted_at=draw(st.floats(0.0, now)),
            nodes=draw(st.sampled_from([1, 1, 1, 2])),
            attained_gpu_s=draw(st.sampled_from([0.0, 0.0, 2000.0])),
            est_duration_s=draw(st.one_of(st.none(), st.floats(1.0, 3000.0))),
        )
        for i in range(draw(st.integers(1, 12)))
    ]
    policy = QueuePolicy(
        mode=draw(st.sampled_from(["fifo", "sjf", "las"])),
        preemption=draw(st.booleans()),
        aging_s_per_priority=draw(st.sampled_from([None, 300.0])),
        las_thresholds_gpu_s=(1500.0,),
        min_run_s=draw(st.sampled_from([0.0, 400.0])),
    )
    return node_gpus, running, pending, policy, now


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queues())
def test_backfill_never_delays_the_heads_reserved_start(
    case: tuple[dict[str, int], list[RunningJob], list[QueuedJob], QueuePolicy, float],
) -> None:
    node_gpus, running, pending, policy, now = case
    first = plan(pending, running, node_gpus, policy, now)
    assert set(first.order) | set(first.reasons) == {j.job_id for j in pending}
    assert not set(first.order) & set(first.reasons)
    assume(first.reservation is not None)
    assert first.reservation is not None
    # Carry the plan out with the real placement, as the simulator and the loop do.
    kept = [job for job in running if job.job_id not in set(first.preempt)]
    by_id = {j.job_id: j for j in pending}
    demands = {j: demand(j, by_id[j].gpus, by_id[j].nodes) for j in first.order}
    decisions = place_plan(
        snapshot_of(node_gpus, running), first, demands, PlacementPolicy(memory_headroom_bytes=0)
    )
    assert all(d.placed for d in decisions), "placement refused a job the policy let start"
    for d in decisions:
        for pl in d.placement:
            assert all(not h.startswith(RESERVED_PREFIX) for h in pl.gpu_uuids)
    started = []
    for d in decisions:
        job = by_id[d.job_id]
        est_end = None if job.est_duration_s is None else now + job.est_duration_s
        nodes = tuple(pl.node_id for pl in d.placement)
        started.append(
            RunningJob(
                job.job_id,
                job.team,
                job.priority,
                job.gpus,
                nodes,
                now,
                attained_gpu_s=job.attained_gpu_s,
                est_end=est_end,
            )
        )
    later = [j for j in pending if j.job_id not in set(first.order)]
    second = plan(later, kept + started, node_gpus, policy, now)
    head = first.reservation.job_id
    if head in second.order:
        return  # it starts now: not delayed
    assert second.reservation is not None and second.reservation.job_id == head
    assert second.reservation.start_at <= first.reservation.start_at


PREDICTIVE = QueuePolicy(
    mode="predictive",
    las_thresholds_gpu_s=(1000.0, 4000.0),
    aging_s_per_priority=None,
    min_run_s=0.0,
    max_est_error=0.5,
)


def test_predictive_ranks_a_trusted_job_by_its_estimate() -> None:
    # "far" has run 100 GPU-s (LAS: queue 0) but has 4,900 GPU-s left (srpt: queue 2).
    new = q("new", 1, at=100.0, est_duration_s=800.0, est_error=0.1)
    far = r("far", "n1", 1, est_end=5000.0, est_error=0.1)
    assert plan([new], [far], {"n1": 1}, PREDICTIVE, 100.0).preempt == ("far",)
    # Untrusted (its family's estimates were off, or never checked): ranked as LAS.
    for error in (0.9, None):
        blind = r("far", "n1", 1, est_end=5000.0, est_error=error)
        assert plan([new], [blind], {"n1": 1}, PREDICTIVE, 100.0).preempt == ()


def test_predictive_ranks_an_untrusted_job_by_attained_service() -> None:
    pending = [
        q("trusted-long", 1, at=0.0, est_duration_s=3000.0, est_error=0.2),  # queue 1
        q("untrusted-late", 1, at=2.0, est_duration_s=9e9, est_error=0.9),  # LAS: queue 0
        q("untrusted-early", 1, at=1.0, est_duration_s=9e9, est_error=0.9),
        q("trusted-short", 1, at=3.0, est_duration_s=100.0, est_error=0.2),  # queue 0
    ]
    p = plan(pending, [], {"n1": 4}, PREDICTIVE, 10.0)
    # Queue 0 by estimate, untrusted estimates counting as none (submit time), then queue 1.
    assert p.order == ("trusted-short", "untrusted-early", "untrusted-late", "trusted-long")
    served = q("untrusted-served", 1, at=0.0, est_error=0.9, attained_gpu_s=5000.0)  # queue 2
    assert plan([served, *pending[:1]], [], {"n1": 1}, PREDICTIVE, 10.0).order == ("trusted-long",)


def test_predictive_names_the_demotion_of_an_untrusted_running_job() -> None:
    running = [r("old", "n1", 1, at=0.0, est_end=9e9, est_error=0.9)]
    pending = [q("new", 1, at=900.0, est_duration_s=60.0, est_error=0.1)]
    before = plan(pending, running, {"n1": 1}, PREDICTIVE, now=960.0)
    assert before.preempt == () and before.next_change_at == pytest.approx(1000.0)
    assert plan(pending, running, {"n1": 1}, PREDICTIVE, now=1000.0).preempt == ("old",)


def ranked_reference(
    pending: list[QueuedJob], usage: dict[str, int], policy: QueuePolicy, now: float
) -> list[str]:
    """Rules 1-4 for ``fifo``/``sjf`` the slow way: the highest rank left, then the team
    within quota and with the fewest GPUs per weight, then its first job by rule 4."""
    aging = policy.aging_s_per_priority

    def rank(job: QueuedJob) -> int:
        since = job.submitted_at if job.queued_at is None else job.queued_at
        steps = 0 if aging is None else max(0, math.floor((now - since) / aging))
        return job.priority + steps

    def within_team(job: QueuedJob) -> tuple[float, float, str]:
        est = math.inf if job.est_duration_s is None else job.est_duration_s
        if policy.mode == "fifo":
            return (job.submitted_at, 0.0, job.job_id)
        return (est, job.submitted_at, job.job_id)

    share, left, out = dict(usage), list(pending), []
    while left:
        top = max(rank(j) for j in left)
        firsts = {}
        for job in sorted((j for j in left if rank(j) == top), key=within_team):
            firsts.setdefault(job.team, job)

        def team_key(job: QueuedJob) -> tuple[bool, float, tuple[float, float, str]]:
            held = share.get(job.team, 0)
            quota = policy.quotas.get(job.team, 0)
            borrowing = bool(policy.quotas) and held + job.total_gpus > quota
            return (borrowing, held / policy.weights.get(job.team, 1.0), within_team(job))

        job = min(firsts.values(), key=team_key)
        out.append(job.job_id)
        share[job.team] = share.get(job.team, 0) + job.total_gpus
        left.remove(job)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_ranked_matches_the_rules_the_slow_way(seed: int) -> None:
    rng = random.Random(seed)
    teams = ["a", "b", "c", "d"]
    policy = QueuePolicy(
        mode=rng.choice(["fifo", "sjf"]),
        aging_s_per_priority=rng.choice([None, 600.0]),
        quotas=rng.choice([{}, {"a": 4, "b": 2, "c": 8}]),
        weights=rng.choice([{}, {"a": 2.0, "c": 0.5}]),
    )
    pending = [
        q(
            f"j{i}",
            rng.choice([1, 1, 2, 4]),
            at=float(rng.randint(0, 3000)),
            team=rng.choice(teams[: rng.randint(1, 4)]),
            prio=rng.choice([0, 0, 1, 2]),
            nodes=rng.choice([1, 1, 2]),
            est_duration_s=rng.choice([None, 60.0, 600.0]),
            queued_at=rng.choice([None, float(rng.randint(0, 3000))]),
        )
        for i in range(120)
    ]
    running = [r(f"r{t}", "n1", rng.randint(0, 4), team=t) for t in teams]
    usage = {x.team: x.gpus for x in running}
    p = plan(pending, running, {"n1": 64}, policy, now=3600.0)
    assert list(p.ranked) == ranked_reference(pending, usage, policy, 3600.0)
