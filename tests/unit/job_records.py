"""A job record as the store would return it for a config just submitted (PENDING)."""

from __future__ import annotations

from scheduler.batch.store import JobRecord
from scheduler.core.states import JobState
from workers.interface.spec import load_spec


def pending_record(text: str, job_id: str, submitted_at: float = 0.0) -> JobRecord:
    """The PENDING record of config ``text``, submitted at ``submitted_at``, never started."""
    spec = load_spec(text)
    return JobRecord(
        id=job_id,
        name=spec.name,
        experiment=spec.experiment,
        team=spec.team,
        priority=spec.priority,
        state=JobState.PENDING,
        spec=spec,
        source_text=text,
        submitted_at=submitted_at,
        updated_at=submitted_at,
        started_at=None,
        finished_at=None,
        attempts=0,
        assignment=None,
        run_id=None,
        model_version=None,
        error=None,
        progress=None,
        pending_reasons=None,
        cancel_requested=False,
        not_before=None,
        preemptions=0,
        resume_reason=None,
        preempt_reason=None,
        queued_at=submitted_at,
        attempt_started_at=None,
        attained_gpu_s=0.0,
        losses=0,
        failures=0,
        lease_generation=None,
    )
