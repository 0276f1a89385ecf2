"""The stores on each backend, a SQLite file and a PostgreSQL database: jobs (create,
transition, attempts, history, reopen), deployments (checked state changes), and the
migration of rows written by older versions."""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from scheduler import db
from scheduler.batch.store import JobStore
from scheduler.core.states import DeploymentState, JobState
from scheduler.realtime.spec import load_deployment
from scheduler.realtime.store import DeploymentStore
from tests.conftest import wait_until
from tests.postgres import PostgresServer
from workers.interface.errors import DeploymentNotFound, IllegalTransition, JobNotFound
from workers.interface.executor import Assignment, NodeAssignment, Progress
from workers.interface.spec import TrainingSpec, load_spec
from workers.interface.telemetry import GpuUuid

TEXT = "name: j\nexperiment: e\nteam: t\nmodel: {name: mlp}\ntrain: {max_steps: 3}\n"


class FakeClock:
    """Advances one second per reading, so every store write has its own time."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def engine(store_url: str) -> Iterator[sa.Engine]:
    engine = db.connect(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: sa.Engine) -> JobStore:
    return JobStore(engine, clock=FakeClock())


def spec(**changes: object) -> TrainingSpec:
    return load_spec(TEXT).model_copy(update=changes)


def assignment(gpus_per_node: int, nodes: int = 1) -> Assignment:
    return Assignment(
        nodes=tuple(
            NodeAssignment(
                node_id=f"n{k}",
                hostname=f"host-{k}",
                gpu_indices=tuple(range(gpus_per_node)),
                gpu_uuids=tuple(GpuUuid(f"GPU-{k}-{i}") for i in range(gpus_per_node)),
            )
            for k in range(nodes)
        )
    )


def test_create_stores_the_typed_spec_pending_with_history(store: JobStore) -> None:
    job = store.create(load_spec(TEXT), TEXT)
    assert job.state is JobState.PENDING
    assert job.spec == load_spec(TEXT)
    assert (job.name, job.experiment, job.team, job.priority) == ("j", "e", "t", 0)
    assert job.queued_at == job.submitted_at
    assert job.attained_gpu_s == 0.0 and job.attempt_started_at is None
    assert [(e.from_state, e.to_state, e.reason) for e in store.history(job.id)] == [
        (None, JobState.PENDING, "submitted")
    ]


def test_transition_records_reason_time_and_typed_fields(store: JobStore) -> None:
    job_id = store.create(spec(), TEXT).id
    placed = assignment(2)
    store.transition(job_id, JobState.SCHEDULED, "placed", assignment=placed)
    progress = Progress(run_id="r1", experiment_id="7", step=3, metrics={"loss": 0.5})
    job = store.transition(job_id, JobState.RUNNING, "started", progress=progress)
    assert job.assignment == placed
    assert job.progress == progress
    assert job.started_at is not None
    job = store.transition(job_id, JobState.SUCCEEDED, "done", model_version="3")
    assert job.finished_at is not None and job.finished_at > job.started_at
    history = store.history(job_id)
    assert [e.to_state for e in history] == [
        JobState.PENDING,
        JobState.SCHEDULED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert [e.at for e in history] == sorted(e.at for e in history)
    assert history[-1].reason == "done"


def test_attempts_keep_what_the_queue_policy_reads(store: JobStore) -> None:
    """Each RUNNING spell adds GPUs x seconds to attained service; each requeue resets queued_at;
    the first start stays the job's start, each attempt has its own."""
    job_id = store.create(spec(), TEXT).id
    store.transition(job_id, JobState.SCHEDULED, "placed", assignment=assignment(2, nodes=2))
    first = store.transition(job_id, JobState.RUNNING, "started")
    assert first.attempt_started_at == first.started_at
    preempted = store.transition(job_id, JobState.PREEMPTED, "preempted")
    ran_s = preempted.updated_at - first.attempt_started_at  # type: ignore[operator]
    assert preempted.attained_gpu_s == pytest.approx(4 * ran_s)  # 2 GPUs on each of 2 nodes
    requeued = store.transition(job_id, JobState.PENDING, "requeued", assignment=None)
    assert requeued.queued_at == requeued.updated_at > first.queued_at
    assert requeued.attained_gpu_s == preempted.attained_gpu_s  # waiting attains nothing
    store.transition(job_id, JobState.SCHEDULED, "placed", assignment=assignment(1))
    second = store.transition(job_id, JobState.RUNNING, "resumed")
    assert second.started_at == first.started_at
    assert second.attempt_started_at == second.updated_at > first.attempt_started_at  # type: ignore[operator]
    done = store.transition(job_id, JobState.SUCCEEDED, "done")
    more_s = done.updated_at - second.attempt_started_at  # type: ignore[operator]
    assert done.attained_gpu_s == pytest.approx(4 * ran_s + 1 * more_s)


def test_ran_s_counts_the_attempts_run_time_not_the_waits_between(store: JobStore) -> None:
    job_id = store.create(spec(), TEXT, submitted_by="ana").id
    store.transition(job_id, JobState.SCHEDULED, "placed")
    first = store.transition(job_id, JobState.RUNNING, "started")
    lost = store.transition(job_id, JobState.PENDING, "lost")
    store.transition(job_id, JobState.SCHEDULED, "placed")
    second = store.transition(job_id, JobState.RUNNING, "resumed")
    assert second.ran_s == lost.ran_s == lost.updated_at - first.updated_at
    done = store.transition(job_id, JobState.SUCCEEDED, "done")
    assert done.ran_s == pytest.approx(lost.ran_s + done.updated_at - second.updated_at)
    assert done.ran_s < done.updated_at - first.updated_at  # the wait is not counted
    assert done.submitted_by == "ana"


def test_recent_finished_lists_the_last_jobs_to_end_in_a_state_oldest_first(
    store: JobStore,
) -> None:
    ids = [store.create(spec(name=f"j{i}"), TEXT).id for i in range(5)]
    for job_id in ids[:4]:
        store.transition(job_id, JobState.SCHEDULED, "placed")
        store.transition(job_id, JobState.RUNNING, "started")
    for job_id in [ids[2], ids[0], ids[3]]:
        store.transition(job_id, JobState.SUCCEEDED, "done")
    store.transition(ids[1], JobState.FAILED, "boom")
    assert [j.id for j in store.recent_finished(JobState.SUCCEEDED, 10)] == [
        ids[2],
        ids[0],
        ids[3],
    ]
    assert [j.id for j in store.recent_finished(JobState.SUCCEEDED, 2)] == [ids[0], ids[3]]
    assert [j.id for j in store.recent_finished(JobState.FAILED, 10)] == [ids[1]]


def test_illegal_transition_changes_nothing(store: JobStore) -> None:
    job_id = store.create(spec(), TEXT).id
    before = store.get(job_id)
    with pytest.raises(IllegalTransition):
        store.transition(job_id, JobState.SUCCEEDED, "skip ahead", model_version="1")
    assert store.get(job_id) == before
    assert len(store.history(job_id)) == 1


def test_update_refuses_state_and_unknown_jobs(store: JobStore) -> None:
    job_id = store.create(spec(), TEXT).id
    with pytest.raises(ValueError, match="transition"):
        store.update(job_id, state="RUNNING")  # type: ignore[call-arg]
    with pytest.raises(JobNotFound):
        store.update("j-missing", preempt_reason="x")
    with pytest.raises(JobNotFound):
        store.get("j-missing")
    store.update(job_id, preempt_reason="for a replica", pending_reasons=["a", "b"])
    job = store.get(job_id)
    assert (job.preempt_reason, job.pending_reasons) == ("for a replica", ("a", "b"))


def test_find_filters_by_state_newest_first(store: JobStore) -> None:
    a = store.create(spec(name="a"), TEXT).id
    b = store.create(spec(name="b"), TEXT).id
    store.transition(a, JobState.CANCELLED, "no")
    assert [j.id for j in store.find()] == [b, a]
    assert [j.id for j in store.find([JobState.PENDING])] == [b]


def test_reopen_keeps_everything_and_migrations_are_versioned(store_url: str) -> None:
    first = JobStore(db.connect(store_url))
    job_id = first.create(spec(), TEXT).id
    first.transition(job_id, JobState.CANCELLED, "bye")
    first.engine.dispose()
    second = JobStore(db.connect(store_url))  # runs the migrations again: must be a no-op
    assert second.get(job_id).state is JobState.CANCELLED
    assert len(second.history(job_id)) == 2
    with second.engine.connect() as conn:
        version = conn.execute(sa.text("select version_num from alembic_version")).scalar()
    second.engine.dispose()
    assert version == "0009"  # the newest migration


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    """WAL lets the API read while the loop writes (the pragmas are SQLite's alone)."""
    engine = db.connect(db.sqlite_url(tmp_path / "jobs.db"))
    with engine.connect() as conn:
        mode = conn.execute(sa.text("pragma journal_mode")).scalar()
    engine.dispose()
    assert mode == "wal"


def test_migration_0004_types_the_assignments_older_versions_stored(store_url: str) -> None:
    """A job placed and being preempted by an older version keeps its nodes, pids and reason."""
    engine = sa.create_engine(store_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    node = {"node_id": "n1", "hostname": "a", "gpu_indices": [1], "gpu_uuids": ["GPU-1"]}
    old = {**node, "pid": 42, "nodes": [{**node, "pid": 42}], "preempt_reason": "for j-2"}
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "insert into jobs (id, name, experiment, team, priority, state, spec_json, "
                "source_text, submitted_at, updated_at, started_at, attempts, assignment_json, "
                "cancel_requested, preemptions) values ('j-1', 'j', 'e', 't', 0, 'RUNNING', "
                ":spec, :text, 10.0, 20.0, 15.0, 1, :assignment, false, 0)"
            ),
            {"spec": spec().model_dump_json(), "text": TEXT, "assignment": json.dumps(old)},
        )
    engine.dispose()
    migrated = db.connect(store_url)
    job = JobStore(migrated).get("j-1")
    migrated.dispose()
    assert job.assignment == Assignment(
        nodes=(
            NodeAssignment(
                node_id="n1",
                hostname="a",
                gpu_indices=(1,),
                gpu_uuids=(GpuUuid("GPU-1"),),
                pid=42,
            ),
        )
    )
    assert job.preempt_reason == "for j-2"
    assert (job.queued_at, job.attempt_started_at, job.attained_gpu_s) == (10.0, 15.0, 0.0)


def test_migration_0008_gives_finished_jobs_their_run_time(store_url: str) -> None:
    """A job that ended before 0008 ran from its start to its end (its attempts unknown);
    one still waiting ran nothing; who submitted either is unknown."""
    engine = sa.create_engine(store_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0007")
    insert = sa.text(
        "insert into jobs (id, name, experiment, team, priority, state, spec_json, source_text, "
        "submitted_at, updated_at, started_at, finished_at, queued_at, attempts, "
        "cancel_requested) values (:id, 'j', 'e', 't', 0, :state, :spec, :text, 10.0, 40.0, "
        ":started, :finished, 10.0, 1, false)"
    )
    values = {"spec": spec().model_dump_json(), "text": TEXT}
    with engine.begin() as conn:
        conn.execute(
            insert, {**values, "id": "j-1", "state": "SUCCEEDED", "started": 15.0, "finished": 40.0}
        )
        conn.execute(
            insert, {**values, "id": "j-2", "state": "PENDING", "started": None, "finished": None}
        )
    engine.dispose()
    migrated = db.connect(store_url)
    store = JobStore(migrated)
    done, waiting = store.get("j-1"), store.get("j-2")
    finished = store.recent_finished(JobState.SUCCEEDED, 10)
    migrated.dispose()
    assert (done.ran_s, waiting.ran_s) == (25.0, 0.0)
    assert done.submitted_by is None
    assert [j.id for j in finished] == ["j-1"]


DEPLOYMENT = "name: mlp\nmodel: models:/mlp@champion\n"


def test_deployment_state_changes_are_checked(engine: sa.Engine) -> None:
    deployments = DeploymentStore(engine, clock=FakeClock())
    record, created = deployments.put(load_deployment(DEPLOYMENT), DEPLOYMENT)
    assert created and record.state is DeploymentState.DEPLOYING
    assert record.spec == load_deployment(DEPLOYMENT)
    deployments.transition("mlp", DeploymentState.DEPLOYING, "waiting for capacity", None, None)
    assert deployments.get("mlp").message == "waiting for capacity"  # same state: an update
    deployments.transition("mlp", DeploymentState.READY, None, "1", "run-1")
    ready = deployments.get("mlp")
    assert (ready.state, ready.model_version, ready.run_id) == (DeploymentState.READY, "1", "run-1")
    _, created = deployments.put(load_deployment(DEPLOYMENT), DEPLOYMENT)
    assert not created and deployments.get("mlp").state is DeploymentState.READY
    deployments.delete("mlp")
    deployments.transition("mlp", DeploymentState.FAILED, "late report", None, None)  # no-op
    with pytest.raises(DeploymentNotFound):
        deployments.get("mlp")


def test_a_deployment_remembers_the_version_it_served_before(engine: sa.Engine) -> None:
    deployments = DeploymentStore(engine, clock=FakeClock())
    deployments.put(load_deployment(DEPLOYMENT), DEPLOYMENT)
    ready, deploying = DeploymentState.READY, DeploymentState.DEPLOYING
    deployments.transition("mlp", ready, None, "1", "run-1")
    assert deployments.previous_version("mlp") is None  # one version served so far
    deployments.transition("mlp", deploying, "rolling", None, None)  # a gap: no version
    deployments.transition("mlp", ready, None, "2", "run-2")
    deployments.transition("mlp", ready, "a note", "2", "run-2")  # the same version again
    assert deployments.previous_version("mlp") == "1"
    deployments.transition("mlp", ready, None, "1", "run-1")  # rolled back
    assert deployments.previous_version("mlp") == "2"
    assert DeploymentStore(engine).previous_version("mlp") == "2"  # kept across restarts
    deployments.delete("mlp")
    deployments.put(load_deployment(DEPLOYMENT), DEPLOYMENT)
    assert deployments.previous_version("mlp") is None  # undeploying forgot them


def test_text_with_a_nul_reads_back_alike_on_every_backend(store: JobStore) -> None:
    """User code may raise with a NUL in its message, and PostgreSQL text cannot hold one:
    the store keeps U+FFFD in its place (on SQLite too), so the job still ends."""
    job_id = store.create(spec(), TEXT).id
    store.note(job_id, "worker said a\x00b")
    job = store.transition(job_id, JobState.FAILED, "failed: a\x00b", error="Error: a\x00b")
    assert job.state is JobState.FAILED and job.error == "Error: a\ufffdb"
    assert [e.reason for e in store.history(job_id)] == [
        "submitted",
        "worker said a\ufffdb",
        "failed: a\ufffdb",
    ]
    deployments = DeploymentStore(store.engine)
    deployments.put(load_deployment(DEPLOYMENT), DEPLOYMENT)
    deployments.transition("mlp", DeploymentState.FAILED, "cannot load: \x00", None, None)
    assert deployments.get("mlp").message == "cannot load: \ufffd"


def test_a_connection_postgres_dropped_is_replaced_not_handed_out(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """After a server restart or a failover the pool holds dead connections: each is tested
    before use (pre-ping) and replaced, so the loop's next pass does not fail on one."""
    engine = db.connect(postgres_url)
    store = JobStore(engine)
    job_id = store.create(spec(), TEXT).id  # leaves a connection in the pool
    assert postgres_server.terminate_connections(postgres_url) >= 1
    assert store.get(job_id).state is JobState.PENDING
    engine.dispose()


def test_a_transition_on_postgres_is_checked_against_what_a_concurrent_one_committed(
    postgres_url: str,
) -> None:
    """Two writers move one job at once (the loop places it while the API cancels it): the
    later one waits for the row and is checked against the state the first one left."""
    engine = db.connect(postgres_url)
    store = JobStore(engine)
    job_id = store.create(spec(), TEXT).id
    outcome: list[Any] = []

    def place() -> None:
        try:
            outcome.append(store.transition(job_id, JobState.SCHEDULED, "placed"))
        except IllegalTransition as exc:
            outcome.append(exc)

    def waiting_for_a_lock() -> bool:
        query = (
            "select count(*) from pg_stat_activity"
            " where datname = current_database() and wait_event_type = 'Lock'"
        )
        with engine.connect() as conn:
            return bool(conn.execute(sa.text(query)).scalar())

    placing = threading.Thread(target=place)
    with engine.begin() as conn:  # the other writer, mid-transaction
        cancelled = {"state": JobState.CANCELLED.value, "finished_at": 2e9}
        conn.execute(db.jobs.update().where(db.jobs.c.id == job_id).values(**cancelled))
        placing.start()
        wait_until(waiting_for_a_lock, "the placement waits for the cancellation's row lock")
    placing.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], IllegalTransition), outcome
    assert store.get(job_id).state is JobState.CANCELLED
    engine.dispose()


def _migrate(url: str, barrier: Any, results: Any) -> None:
    """In a process of its own, as a control plane starting: open the store, migrating it."""
    barrier.wait(timeout=120)
    try:
        db.connect(url).dispose()
        results.put("migrated")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_control_planes_starting_together_on_a_new_postgres_database_all_start(
    postgres_url: str,
) -> None:
    """A leader and its standby started at once on an empty database: one creates the
    tables, the others wait for it and find them (processes: Alembic's context is global)."""
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that runs Ray threads
    barrier, results = spawn.Barrier(3), spawn.Queue()
    planes = [spawn.Process(target=_migrate, args=(postgres_url, barrier, results)) for _ in "abc"]
    for plane in planes:
        plane.start()
    outcomes = [results.get(timeout=180) for _ in planes]
    for plane in planes:
        plane.join(timeout=30)
    assert outcomes == ["migrated"] * 3
