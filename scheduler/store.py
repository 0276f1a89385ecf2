"""The job store: SQLAlchemy over SQLite (WAL) by default, PostgreSQL by URL.

The schema is created and upgraded by Alembic migrations when the store opens.
:meth:`JobStore.transition` is the one place that changes a job's state: it
checks the move against :mod:`scheduler.states` and records it, with its
reason and time, in the job's history, in the same database transaction.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from scheduler.errors import JobNotFound
from scheduler.states import TERMINAL, JobState, check_transition
from scheduler.tables import job_events, jobs

Clock = Callable[[], float]


@dataclass(frozen=True)
class JobEvent:
    at: float
    from_state: JobState | None
    to_state: JobState
    reason: str


@dataclass(frozen=True)
class JobRecord:
    """A job row as the rest of the control plane sees it."""

    id: str
    name: str
    experiment: str
    team: str
    priority: int
    state: JobState
    spec: dict[str, Any]
    source_text: str
    submitted_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    assignment: dict[str, Any] | None
    run_id: str | None
    model_version: str | None
    error: str | None
    progress: dict[str, Any] | None
    pending_reasons: list[str] | None
    cancel_requested: bool
    not_before: float | None = None  # a retry waits for its backoff until then
    preemptions: int = 0
    resume_reason: str | None = None  # why the previous attempt ended, for the next one

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


# Columns stored as JSON text, and the attribute names they map to.
_JSON_COLUMNS = {
    "spec_json": "spec",
    "assignment_json": "assignment",
    "progress_json": "progress",
    "pending_reasons_json": "pending_reasons",
}


def _record(row: sa.Row[Any]) -> JobRecord:
    data = dict(row._mapping)
    for column, attr in _JSON_COLUMNS.items():
        raw = data.pop(column)
        data[attr] = json.loads(raw) if raw is not None else None
    data["state"] = JobState(data["state"])
    return JobRecord(**data)


def _encode(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        column = next((c for c, a in _JSON_COLUMNS.items() if a == key), None)
        if column is None:
            out[key] = value
        else:
            out[column] = json.dumps(value) if value is not None else None
    return out


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class JobStore:
    """Jobs and their histories.

    Example::

        store = JobStore("sqlite:///.jobworker/jobs.db")
        job = store.create(name="t", experiment="e", team="t", priority=0,
                           spec={...}, source_text="...")
        store.transition(job.id, JobState.SCHEDULED, "placed on node-a")
    """

    def __init__(self, url: str, clock: Clock = time.time) -> None:
        self.url = url
        self.clock = clock
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrate()

    def _migrate(self) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    def create(
        self,
        *,
        name: str,
        experiment: str,
        team: str,
        priority: int,
        spec: dict[str, Any],
        source_text: str,
    ) -> JobRecord:
        """Store a new PENDING job and its first history entry, atomically."""
        now = self.clock()
        job_id = f"j-{time.strftime('%Y%m%d', time.gmtime(now))}-{secrets.token_hex(4)}"
        with self._tx() as conn:
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    name=name,
                    experiment=experiment,
                    team=team,
                    priority=priority,
                    state=JobState.PENDING.value,
                    spec_json=json.dumps(spec),
                    source_text=source_text,
                    submitted_at=now,
                    updated_at=now,
                    attempts=0,
                    cancel_requested=False,
                )
            )
            conn.execute(
                job_events.insert().values(
                    job_id=job_id, at=now, from_state=None, to_state="PENDING", reason="submitted"
                )
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _record(row)

    def find(self, states: Sequence[JobState] | None = None, limit: int = 1000) -> list[JobRecord]:
        """Jobs, newest first, optionally only those in ``states``."""
        query = sa.select(jobs).order_by(jobs.c.submitted_at.desc()).limit(limit)
        if states:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(query)]

    def history(self, job_id: str) -> list[JobEvent]:
        query = sa.select(job_events).where(job_events.c.job_id == job_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(job_events.c.id)).all()
        return [
            JobEvent(
                at=r.at,
                from_state=JobState(r.from_state) if r.from_state else None,
                to_state=JobState(r.to_state),
                reason=r.reason,
            )
            for r in rows
        ]

    def transition(self, job_id: str, target: JobState, reason: str, **fields: Any) -> JobRecord:
        """Move a job to ``target`` (checked), record why, and set ``fields`` with it.

        Raises :class:`IllegalTransition` for a move the state machine forbids,
        leaving the job untouched.
        """
        now = self.clock()
        with self._tx() as conn:
            query = sa.select(jobs.c.state, jobs.c.started_at).where(jobs.c.id == job_id)
            if self.engine.dialect.name != "sqlite":
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            current = JobState(row.state)
            check_transition(current, target)
            values = _encode(fields)
            values.update(state=target.value, updated_at=now)
            if target is JobState.RUNNING and row.started_at is None:
                values["started_at"] = now
            if target in TERMINAL:
                values["finished_at"] = now
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
            conn.execute(
                job_events.insert().values(
                    job_id=job_id,
                    at=now,
                    from_state=current.value,
                    to_state=target.value,
                    reason=reason,
                )
            )
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> None:
        """Set non-state fields (progress, pending reasons, run id, cancel flag)."""
        if "state" in fields:
            raise ValueError("state changes go through transition()")
        values = _encode(fields)
        values["updated_at"] = self.clock()
        with self._tx() as conn:
            result = conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        if result.rowcount == 0:
            raise JobNotFound(f"no job {job_id!r}")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets the API read while the loop writes; busy_timeout rides out short locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
