"""The job store on a real SQLite file: create, transition, history, reopen."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler.errors import IllegalTransition, JobNotFound
from scheduler.states import JobState
from scheduler.store import JobStore, sqlite_url


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(sqlite_url(tmp_path / "jobs.db"), clock=FakeClock())


def make_job(store: JobStore, **kw: object) -> str:
    fields: dict[str, object] = {
        "name": "j",
        "experiment": "e",
        "team": "t",
        "priority": 0,
        "spec": {"a": 1},
        "source_text": "a: 1",
        **kw,
    }
    return store.create(**fields).id  # type: ignore[arg-type]


def test_create_stores_pending_with_history(store: JobStore) -> None:
    job_id = make_job(store)
    job = store.get(job_id)
    assert job.state is JobState.PENDING
    assert job.spec == {"a": 1}
    assert [(e.from_state, e.to_state, e.reason) for e in store.history(job_id)] == [
        (None, JobState.PENDING, "submitted")
    ]


def test_transition_records_reason_time_and_fields(store: JobStore) -> None:
    job_id = make_job(store)
    store.transition(job_id, JobState.SCHEDULED, "placed", assignment={"node_id": "n1"})
    job = store.transition(job_id, JobState.RUNNING, "started")
    assert job.assignment == {"node_id": "n1"}
    assert job.started_at is not None
    job = store.transition(job_id, JobState.SUCCEEDED, "done", model_version="3")
    assert job.finished_at is not None and job.finished_at > job.started_at  # type: ignore[operator]
    history = store.history(job_id)
    assert [e.to_state for e in history] == [
        JobState.PENDING,
        JobState.SCHEDULED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert [e.at for e in history] == sorted(e.at for e in history)
    assert history[-1].reason == "done"


def test_illegal_transition_changes_nothing(store: JobStore) -> None:
    job_id = make_job(store)
    before = store.get(job_id)
    with pytest.raises(IllegalTransition):
        store.transition(job_id, JobState.SUCCEEDED, "skip ahead", model_version="1")
    assert store.get(job_id) == before
    assert len(store.history(job_id)) == 1


def test_update_refuses_state_and_unknown_jobs(store: JobStore) -> None:
    job_id = make_job(store)
    with pytest.raises(ValueError, match="transition"):
        store.update(job_id, state="RUNNING")
    with pytest.raises(JobNotFound):
        store.update("j-missing", progress={"step": 1})
    with pytest.raises(JobNotFound):
        store.get("j-missing")


def test_find_filters_by_state_newest_first(store: JobStore) -> None:
    a = make_job(store, name="a")
    b = make_job(store, name="b")
    store.transition(a, JobState.CANCELLED, "no")
    assert [j.id for j in store.find()] == [b, a]
    assert [j.id for j in store.find([JobState.PENDING])] == [b]


def test_reopen_keeps_everything_and_migrations_are_versioned(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "jobs.db")
    first = JobStore(url)
    job_id = make_job(first)
    first.transition(job_id, JobState.CANCELLED, "bye")
    first.close()
    second = JobStore(url)  # runs the migrations again: must be a no-op
    assert second.get(job_id).state is JobState.CANCELLED
    assert len(second.history(job_id)) == 2
    with second.engine.connect() as conn:
        version = conn.execute(sa.text("select version_num from alembic_version")).scalar()
        mode = conn.execute(sa.text("pragma journal_mode")).scalar()
    assert version == "0003"  # the newest migration
    assert mode == "wal"
