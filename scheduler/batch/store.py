"""The job store: jobs, their attempts and their histories, in the control plane's database.

:meth:`JobStore.transition` is the one place that changes a job's state: it
checks the move against :mod:`scheduler.core.states` and records it, with its
reason and time, in the job's history, in the same database transaction. It
also keeps what the queue policy reads of a job's attempts (when it last
entered the queue, when its current attempt started, the GPU-seconds its
ended attempts ran), so the live loop hands the policy what the simulator does.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import sqlalchemy as sa

from scheduler.core.states import TERMINAL, JobState, check_transition
from scheduler.db import job_events, jobs
from workers.interface.errors import JobNotFound
from workers.interface.executor import Assignment, Progress
from workers.interface.spec import TrainingSpec, stored_spec

Clock = Callable[[], float]


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history: a state change, when, and why."""

    at: float
    from_state: JobState | None
    to_state: JobState
    reason: str


@dataclass(frozen=True)
class JobRecord:
    """A job as the rest of the control plane sees it: its spec, state and attempts.

    ``started_at`` is its first start, ``attempt_started_at`` the start of its
    current (or last) attempt; ``queued_at`` when it last entered the queue;
    ``attained_gpu_s`` the GPU-seconds of its attempts that have ended and
    ``ran_s`` their seconds; ``preempt_reason`` is set while a preemption is in
    progress; ``submitted_by`` is the submitting token's name (None: unknown);
    ``predicted_s`` its run time as predicted when it first started (None: no
    prediction then).
    """

    id: str
    name: str
    experiment: str
    team: str
    priority: int
    state: JobState
    spec: TrainingSpec
    source_text: str
    submitted_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    assignment: Assignment | None
    run_id: str | None
    model_version: str | None
    error: str | None
    progress: Progress | None
    pending_reasons: tuple[str, ...] | None
    cancel_requested: bool
    not_before: float | None  # a retry waits for its backoff until then
    preemptions: int
    resume_reason: str | None  # why the previous attempt ended, for the next one
    preempt_reason: str | None
    queued_at: float
    attempt_started_at: float | None
    attained_gpu_s: float
    losses: int  # attempts lost with their worker, node, Ray or control plane
    failures: int  # attempts whose own process failed
    lease_generation: int | None  # of the leader that placed its current or last attempt
    ran_s: float = 0.0
    submitted_by: str | None = None
    predicted_s: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class JobFields(TypedDict, total=False):
    """What :meth:`JobStore.transition` and :meth:`JobStore.update` may set besides the state."""

    assignment: Assignment | None
    attempts: int
    run_id: str | None
    model_version: str | None
    error: str | None
    progress: Progress | None
    pending_reasons: Sequence[str] | None
    cancel_requested: bool
    not_before: float | None
    preemptions: int
    resume_reason: str | None
    preempt_reason: str | None
    losses: int
    failures: int
    lease_generation: int | None
    predicted_s: float | None


def _record(row: sa.Row[Any]) -> JobRecord:
    d = row._mapping
    assignment, progress, reasons = (
        d["assignment_json"],
        d["progress_json"],
        d["pending_reasons_json"],
    )
    return JobRecord(
        id=d["id"],
        name=d["name"],
        experiment=d["experiment"],
        team=d["team"],
        priority=d["priority"],
        state=JobState(d["state"]),
        spec=stored_spec(d["spec_json"]),
        source_text=d["source_text"],
        submitted_at=d["submitted_at"],
        updated_at=d["updated_at"],
        started_at=d["started_at"],
        finished_at=d["finished_at"],
        attempts=d["attempts"],
        assignment=Assignment.model_validate_json(assignment) if assignment else None,
        run_id=d["run_id"],
        model_version=d["model_version"],
        error=d["error"],
        progress=Progress.model_validate_json(progress) if progress else None,
        pending_reasons=tuple(json.loads(reasons)) if reasons else None,
        cancel_requested=d["cancel_requested"],
        not_before=d["not_before"],
        preemptions=d["preemptions"],
        resume_reason=d["resume_reason"],
        preempt_reason=d["preempt_reason"],
        queued_at=d["queued_at"],
        attempt_started_at=d["attempt_started_at"],
        attained_gpu_s=d["attained_gpu_s"],
        losses=d["losses"],
        failures=d["failures"],
        lease_generation=d["lease_generation"],
        ran_s=d["ran_s"],
        submitted_by=d["submitted_by"],
        predicted_s=d["predicted_s"],
    )


def _columns(fields: JobFields) -> dict[str, Any]:
    """``fields`` as column values: typed values as their JSON."""
    typed = ("assignment", "progress", "pending_reasons")
    out: dict[str, Any] = {k: v for k, v in fields.items() if k not in typed}
    if "assignment" in fields:
        assignment = fields["assignment"]
        out["assignment_json"] = assignment.model_dump_json() if assignment else None
    if "progress" in fields:
        progress = fields["progress"]
        out["progress_json"] = progress.model_dump_json() if progress else None
    if "pending_reasons" in fields:
        reasons = fields["pending_reasons"]
        out["pending_reasons_json"] = json.dumps(list(reasons)) if reasons is not None else None
    return out


class JobStore:
    """Jobs and their histories.

    Example::

        store = JobStore(connect("sqlite:///.jobworker/jobs.db"))
        job = store.create(load_spec(text), text)
        store.transition(job.id, JobState.SCHEDULED, "placed on node-a", assignment=...)
    """

    def __init__(self, engine: sa.Engine, clock: Clock = time.time) -> None:
        self.engine = engine
        self.clock = clock

    @contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    def create(
        self,
        spec: TrainingSpec,
        source_text: str,
        in_tx: Callable[[sa.Connection], None] | None = None,
        submitted_by: str | None = None,
    ) -> JobRecord:
        """Store a new PENDING job and its first history entry, atomically; ``in_tx`` runs
        first in the same transaction (a model-name claim), and what it raises stores nothing.
        ``submitted_by``: the submitting token's name, a family key of the predictor."""
        now = self.clock()
        job_id = f"j-{time.strftime('%Y%m%d', time.gmtime(now))}-{secrets.token_hex(4)}"
        with self._tx() as conn:
            if in_tx is not None:
                in_tx(conn)
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    name=spec.name,
                    experiment=spec.experiment,
                    team=spec.team,
                    priority=spec.priority,
                    state=JobState.PENDING.value,
                    spec_json=spec.model_dump_json(),
                    source_text=source_text,
                    submitted_at=now,
                    updated_at=now,
                    queued_at=now,
                    attempts=0,
                    cancel_requested=False,
                    submitted_by=submitted_by,
                )
            )
            conn.execute(
                job_events.insert().values(
                    job_id=job_id, at=now, from_state=None, to_state="PENDING", reason="submitted"
                )
            )
        return self.get(job_id)

    def run_team(self, run_id: str) -> str | None:
        """The team of the job whose MLflow run this is, or None when no job made it."""
        with self.engine.connect() as conn:
            query = sa.select(jobs.c.team).where(jobs.c.run_id == run_id).limit(1)
            return conn.execute(query).scalar_one_or_none()

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

    def count_by_state_team(self) -> dict[tuple[str, str], int]:
        """How many jobs each (state, team) has: one grouped count, for ``/metrics``."""
        query = sa.select(jobs.c.state, jobs.c.team, sa.func.count()).group_by(
            jobs.c.state, jobs.c.team
        )
        with self.engine.connect() as conn:
            return {(state, team): n for state, team, n in conn.execute(query)}

    def recent_finished(self, state: JobState, limit: int) -> list[JobRecord]:
        """The last ``limit`` jobs to end in ``state`` (terminal), oldest end first.

        The predictor's history; one read of the ``(state, finished_at)`` index.
        A row that cannot be read as a job is left out.
        """
        query = (
            sa.select(jobs)
            .where(jobs.c.state == state.value, jobs.c.finished_at.is_not(None))
            .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        records = []
        for row in reversed(rows):
            try:
                records.append(_record(row))
            except ValueError:  # a spec this version refuses: no history, nothing else lost
                continue
        return records

    def all_in(
        self,
        states: Sequence[JobState],
        page: int = 500,
        unreadable: Callable[[str, Exception], None] | None = None,
    ) -> list[JobRecord]:
        """Every job in ``states``, oldest first, however many: read a page at a time.

        The reconcile loop's view. Unlike :meth:`find` (a listing, capped), nothing
        is left out, so an old pending job cannot starve unseen and an old running
        one is still polled and cancelled. Keyset pages on the indexed state column.
        A row that cannot be read as a job (a spec stored by a version that wrote
        what this one refuses) is handed to ``unreadable`` and left out, or raises.
        """
        values = [s.value for s in states]
        records: list[JobRecord] = []
        after: tuple[float, str] | None = None
        while True:
            query = (
                sa.select(jobs)
                .where(jobs.c.state.in_(values))
                .order_by(jobs.c.submitted_at, jobs.c.id)
                .limit(page)
            )
            if after is not None:
                query = query.where(sa.tuple_(jobs.c.submitted_at, jobs.c.id) > after)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                try:
                    records.append(_record(row))
                except ValueError as exc:  # pydantic's ValidationError among them
                    if unreadable is None:
                        raise
                    unreadable(row.id, exc)
            if len(rows) < page:
                return records
            after = (rows[-1].submitted_at, rows[-1].id)

    def note(self, job_id: str, reason: str) -> None:
        """Add ``reason`` to a job's history without changing its state (a problem seen)."""
        with self._tx() as conn:
            row = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).first()
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            conn.execute(
                job_events.insert().values(
                    job_id=job_id,
                    at=self.clock(),
                    from_state=row.state,
                    to_state=row.state,
                    reason=reason,
                )
            )

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

    def transition(
        self,
        job_id: str,
        target: JobState,
        reason: str,
        fence: Callable[[sa.Connection], None] | None = None,
        **fields: Unpack[JobFields],
    ) -> JobRecord:
        """Move a job to ``target`` (checked), record why, and set ``fields`` with it.

        Also keeps the attempt bookkeeping: entering RUNNING starts an attempt
        (and the job, the first time); leaving it adds the attempt's GPU-seconds
        to ``attained_gpu_s`` and its seconds to ``ran_s``; entering PENDING
        (re)sets ``queued_at``. Raises
        :class:`IllegalTransition` for a move the state machine forbids,
        leaving the job untouched. ``fence`` runs first in the same transaction
        (the leader lease's check): what it raises leaves the job untouched too.
        """
        now = self.clock()
        with self._tx() as conn:
            if fence is not None:
                fence(conn)
            query = sa.select(
                jobs.c.state,
                jobs.c.started_at,
                jobs.c.attempt_started_at,
                jobs.c.attained_gpu_s,
                jobs.c.ran_s,
                jobs.c.assignment_json,
            ).where(jobs.c.id == job_id)
            if self.engine.dialect.name != "sqlite":
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            current = JobState(row.state)
            check_transition(current, target)
            values = _columns(fields)
            values.update(state=target.value, updated_at=now)
            if target is JobState.RUNNING:
                values["attempt_started_at"] = now
                if row.started_at is None:
                    values["started_at"] = now
            elif current is JobState.RUNNING and row.attempt_started_at is not None:
                held = (
                    Assignment.model_validate_json(row.assignment_json).gpus
                    if row.assignment_json
                    else 0
                )
                ran_s = max(0.0, now - row.attempt_started_at)
                values["attained_gpu_s"] = row.attained_gpu_s + ran_s * held
                values["ran_s"] = row.ran_s + ran_s
            if target is JobState.PENDING:
                values["queued_at"] = now
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

    def update(self, job_id: str, **fields: Unpack[JobFields]) -> None:
        """Set non-state fields (progress, pending reasons, run id, cancel flag, ...)."""
        if "state" in fields:  # an untyped caller; state changes are checked, not set
            raise ValueError("state changes go through transition()")
        values = _columns(fields)
        values["updated_at"] = self.clock()
        with self._tx() as conn:
            result = conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        if result.rowcount == 0:
            raise JobNotFound(f"no job {job_id!r}")
