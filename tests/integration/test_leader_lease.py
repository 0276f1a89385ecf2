"""Two control planes on one store: exactly one leads, the other takes over, none launches twice.

The store is real (SQLite and PostgreSQL, two engines as two processes would have); the
clock is passed in, so expiry is a value, not a wait. The workers are a stand-in
that records every launch, shared by both control planes as one Ray cluster is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from scheduler import db
from scheduler.batch.lease import Lease
from scheduler.batch.loop import LoopSettings, Scheduler
from scheduler.batch.store import JobStore
from scheduler.core.states import JobState
from tests.integration.test_loop_isolation import config
from tests.unit.placement_factories import _gpu, _node
from workers.interface.executor import LaunchRequest, WorkerPhase, WorkerReport
from workers.interface.spec import load_spec
from workers.interface.telemetry import NodeReading

TTL_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """One node of two GPUs; ``during_pass`` runs while a pass reads telemetry."""

    def __init__(self) -> None:
        self.during_pass: list[object] = []

    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        while self.during_pass:
            action = self.during_pass.pop()
            assert callable(action)
            action()
        return (_node("node-a", gpus=[_gpu(0), _gpu(1)]),)


class Workers:
    def __init__(self) -> None:
        self.launches: list[tuple[str, int]] = []  # (job id, attempt)

    def launch(self, request: LaunchRequest) -> None:
        self.launches.append((request.job_id, request.attempt))

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        return {j: WorkerReport(j, WorkerPhase.RUNNING, pid=7) for j in job_ids}

    def stop(self, job_id: str, grace_s: float) -> None:
        pass

    def release(self, job_id: str) -> None:
        pass

    def active(self) -> set[str]:
        return {j for j, _ in self.launches}


def plane(
    url: str, name: str, clock: Clock, cluster: Cluster, workers: Workers, tmp_path: Path
) -> tuple[Scheduler, JobStore, Lease]:
    engine = db.connect(url)  # its own engine, as a second process would have
    store = JobStore(engine, clock=clock)
    lease = Lease(engine, holder=f"elsewhere:{name}", ttl_s=TTL_S, clock=clock)
    settings = LoopSettings(tracking_uri="unused", log_dir=tmp_path / name)
    return Scheduler(store, workers, cluster, settings, clock=clock, lease=lease), store, lease


def submit(store: JobStore, name: str) -> str:
    text = config(name)
    return store.create(load_spec(text), text).id


def test_one_leads_the_other_takes_over_when_it_stops_renewing(
    store_url: str, tmp_path: Path
) -> None:
    url = store_url
    clock, cluster, workers = Clock(), Cluster(), Workers()
    a, store, lease_a = plane(url, "a", clock, cluster, workers, tmp_path)
    b, _, lease_b = plane(url, "b", clock, cluster, workers, tmp_path)
    first = submit(store, "first")

    a.run_once()
    b.run_once()
    assert (a.leading, b.leading) == (True, False)
    assert workers.launches == [(first, 1)]  # placed once, by the leader
    assert store.get(first).lease_generation == 1

    second = submit(store, "second")
    clock.now += TTL_S - 1  # a is alive and renews: b stays a standby
    a.run_once()
    b.run_once()
    assert (lease_a.generation, lease_b.generation) == (1, None)
    assert workers.launches == [(first, 1), (second, 1)]

    third = submit(store, "third")
    clock.now += TTL_S + 1  # a stops renewing (it died): b takes over
    b.run_once()
    assert (b.leading, lease_b.generation) == (True, 2)
    a.run_once()  # a comes back: the lease is b's, a does nothing
    assert (a.leading, lease_a.generation) == (False, None)
    launched = [job for job, _ in workers.launches]
    assert sorted(launched) == sorted([first, second]) and third not in launched
    assert store.get(third).state is JobState.PENDING  # both GPUs are busy
    assert len(launched) == len(set(launched))


def test_a_leader_that_paused_past_its_lease_places_nothing(store_url: str, tmp_path: Path) -> None:
    url = store_url
    clock, cluster, workers = Clock(), Cluster(), Workers()
    a, store, _ = plane(url, "a", clock, cluster, workers, tmp_path)
    b, _, lease_b = plane(url, "b", clock, cluster, workers, tmp_path)
    a.run_once()  # a leads (generation 1)
    job = submit(store, "contested")

    def b_takes_over_while_a_is_paused() -> None:
        clock.now += TTL_S + 1
        assert lease_b.renew()

    # a renews, then pauses mid-pass (here: while it reads telemetry) past its lease;
    # b takes over meanwhile. a's placement must fail on the fence: no launch.
    cluster.during_pass.append(b_takes_over_while_a_is_paused)
    a.run_once()
    assert lease_b.generation == 2
    assert workers.launches == []
    assert store.get(job).state is JobState.PENDING
    assert not any("could not schedule" in e.reason for e in store.history(job))

    b.run_once()
    assert workers.launches == [(job, 1)]
    assert store.get(job).lease_generation == 2


def test_a_clean_stop_hands_over_at_once(store_url: str, tmp_path: Path) -> None:
    url = store_url
    clock, cluster, workers = Clock(), Cluster(), Workers()
    a, _, _ = plane(url, "a", clock, cluster, workers, tmp_path)
    b, _, _ = plane(url, "b", clock, cluster, workers, tmp_path)
    a.run_once()
    b.run_once()
    assert not b.leading
    a.stop()  # gives the lease up
    b.run_once()  # no expiry to wait for
    assert b.leading
