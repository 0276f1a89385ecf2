"""One job's trouble stays that job's: the reconcile loop goes on for every other job.

The job store is real (SQLite and PostgreSQL) and so is the disk; the workers are a
stand-in that reports what each test needs, and the cluster is one node of two simulated
GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler import db
from scheduler.batch import placement_pass
from scheduler.batch.loop import LoopSettings, Scheduler
from scheduler.batch.store import JobRecord, JobStore
from scheduler.core.gpu_memory import AutoGpuMemory
from scheduler.core.model import Demand
from scheduler.core.states import JobState
from scheduler.db import jobs
from tests.unit.placement_factories import _gpu, _node
from workers.interface.executor import LaunchRequest, WorkerPhase, WorkerReport
from workers.interface.spec import load_spec
from workers.interface.telemetry import NodeReading


def config(name: str) -> str:
    return (
        f"name: {name}\nentrypoint: tests.integration.user_code:run_until_stopped\n"
        "train: {max_steps: 1}\n"
        "resources: {gpus: 1, gpu_memory_gb: 4, cpus: 1, memory_gb: 1}\n"
    )


class OneNode:
    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        return (_node("node-a", gpus=[_gpu(0), _gpu(1)]),)


class Workers:
    """Runs whatever is launched; reports ``logs`` once per poll; can be made to fail."""

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.stopped: list[str] = []
        self.logs: dict[str, str] = {}
        self.poll_error: Exception | None = None
        self.stop_errors: list[Exception] = []

    def launch(self, request: LaunchRequest) -> None:
        self.launched.append(request.job_id)

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        if self.poll_error is not None:
            raise self.poll_error
        return {
            j: WorkerReport(j, WorkerPhase.RUNNING, pid=4242, logs=self.logs.pop(j, ""))
            for j in job_ids
        }

    def stop(self, job_id: str, grace_s: float) -> None:
        if self.stop_errors:
            raise self.stop_errors.pop(0)
        self.stopped.append(job_id)

    def release(self, job_id: str) -> None:
        pass

    def active(self) -> set[str]:
        return set(self.launched)


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    engine = db.connect(store_url)
    yield JobStore(engine, clock=lambda: 1000.0)
    engine.dispose()


def loop_over(store: JobStore, workers: Workers, tmp_path: Path) -> Scheduler:
    settings = LoopSettings(tracking_uri="unused", log_dir=tmp_path / "logs")
    return Scheduler(store, workers, OneNode(), settings, clock=lambda: 1000.0)


def submit(store: JobStore, name: str) -> str:
    text = config(name)
    return store.create(load_spec(text), text).id


def test_a_job_the_planner_cannot_convert_fails_alone(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every spec the API accepts now converts (the specs cap their numbers; 1e308 GB once
    # overflowed here). A job that still could not, through a bug or a spec an older
    # version stored, must fail alone: the conversion is made to fail for that job only.
    poison = submit(store, "poison")
    normal = submit(store, "normal")
    convert = placement_pass.demand_of

    def demand_of(job: JobRecord, auto: AutoGpuMemory | None = None) -> Demand:
        if job.id == poison:
            raise OverflowError("cannot convert float infinity to integer")
        return convert(job, auto)

    monkeypatch.setattr(placement_pass, "demand_of", demand_of)  # the loop converts there
    workers = Workers()

    loop_over(store, workers, tmp_path).run_once()

    failed = store.get(poison)
    assert failed.state is JobState.FAILED
    assert "cannot plan it: OverflowError" in (failed.error or "")
    assert store.get(normal).state is JobState.SCHEDULED
    assert workers.launched == [normal]


def test_the_loop_sees_every_pending_job_however_many(store: JobStore, tmp_path: Path) -> None:
    # All submitted in the same second (the store's clock is fixed): the pages are keyed
    # on (submitted_at, id), so no job is skipped or read twice at a page boundary.
    ids = [submit(store, f"job-{i}") for i in range(1_203)]
    assert [j.id for j in store.all_in([JobState.PENDING], page=100)] == sorted(ids)

    loop = loop_over(store, Workers(), tmp_path)
    loop.run_once()

    states = [store.get(i).state for i in ids]
    assert states.count(JobState.SCHEDULED) == 2  # two GPUs
    assert states.count(JobState.PENDING) == 1_201
    assert len(loop.queue()) == 1_201  # a listing capped at 1,000 would show fewer


def test_workers_that_cannot_be_polled_do_not_stop_placement(
    store: JobStore, tmp_path: Path
) -> None:
    first = submit(store, "first")
    workers = Workers()
    loop = loop_over(store, workers, tmp_path)
    loop.run_once()
    assert store.get(first).state is JobState.SCHEDULED
    second = submit(store, "second")
    workers.poll_error = ConnectionError("Ray is not answering")

    loop.run_once()

    assert store.get(second).state is JobState.SCHEDULED
    assert workers.launched == [first, second]


def test_a_stop_that_cannot_be_delivered_is_asked_again(store: JobStore, tmp_path: Path) -> None:
    job = submit(store, "cancel-me")
    workers = Workers()
    loop = loop_over(store, workers, tmp_path)
    loop.run_once()
    store.update(job, cancel_requested=True)
    workers.stop_errors.append(TimeoutError("the worker's node did not answer"))

    loop.run_once()
    assert workers.stopped == []
    assert any("TimeoutError" in e.reason for e in store.history(job))

    loop.run_once()
    assert workers.stopped == [job]
    loop.run_once()
    assert workers.stopped == [job]  # once delivered, not asked again


def test_a_full_disk_loses_no_log_chunk(store: JobStore, tmp_path: Path) -> None:
    job = submit(store, "chatty")
    workers = Workers()
    loop = loop_over(store, workers, tmp_path)
    loop.run_once()
    log_path = loop.log_path(job)
    os.symlink("/dev/full", log_path)  # every write there fails with ENOSPC
    workers.logs[job] = "step 1\n"

    loop.run_once()
    workers.logs[job] = "step 2\n"
    loop.run_once()

    assert store.get(job).state is JobState.RUNNING
    notes = [e.reason for e in store.history(job) if "could not write its log" in e.reason]
    assert len(notes) == 1 and "No space left on device" in notes[0]  # noted once
    log_path.unlink()  # space again
    workers.logs[job] = "step 3\n"
    loop.run_once()
    assert log_path.read_text() == "step 1\nstep 2\nstep 3\n"


def test_a_stored_spec_that_cannot_be_read_is_left_out_and_noted(
    store: JobStore, tmp_path: Path
) -> None:
    # As an older version stored an infinity: JSON has none, so it wrote null.
    broken = submit(store, "broken")
    with store.engine.begin() as conn:
        spec_json = conn.execute(sa.select(jobs.c.spec_json).where(jobs.c.id == broken)).scalar()
        spec_json = spec_json.replace('"gpu_memory_gb":4.0', '"gpu_memory_gb":null')
        conn.execute(jobs.update().where(jobs.c.id == broken).values(spec_json=spec_json))
    normal = submit(store, "normal")
    loop = loop_over(store, Workers(), tmp_path)

    loop.run_once()
    loop.run_once()

    notes = [e.reason for e in store.history(broken) if "cannot be read" in e.reason]
    assert len(notes) == 1 and "gpu_memory_gb" in notes[0]  # noted once, not every pass
    assert store.get(normal).state is JobState.RUNNING  # placed, then seen running


class Lost(Workers):
    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        return {j: WorkerReport(j, WorkerPhase.LOST, error="node gone") for j in job_ids}


def test_losses_never_count_against_max_retries_up_to_max_losses(
    store: JobStore, tmp_path: Path
) -> None:
    job = submit(store, "unlucky")  # max_retries: 0
    settings = LoopSettings(
        tracking_uri="unused", log_dir=tmp_path / "logs", retry_backoff_s=0, max_losses=2
    )
    workers = Lost()
    loop = Scheduler(store, workers, OneNode(), settings, clock=lambda: 1000.0)

    for _ in range(20):  # placed, lost, placed, lost, placed, lost: failed
        loop.run_once()
        if store.get(job).terminal:
            break

    done = store.get(job)
    assert done.state is JobState.FAILED
    assert (done.attempts, done.losses, done.failures) == (3, 2, 0)
    assert "lost 3 times (max_losses)" in (done.error or "")
    requeued = [e.reason for e in store.history(job) if e.to_state is JobState.PENDING]
    assert requeued[1:] == [
        "lost: node gone; requeued (loss 1, not counted against max_retries); "
        "resumes in 0 s from its last checkpoint",
        "lost: node gone; requeued (loss 2, not counted against max_retries); "
        "resumes in 0 s from its last checkpoint",
    ]
