"""The job service: what the API and the CLI can ask of the control plane.

It validates and stores, reads, and flags; it never launches or stops a
worker itself — the loop does, on its next pass (woken at once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from scheduler.batch.store import JobEvent, JobRecord, JobStore
from scheduler.core.states import JobState
from workers.interface.spec import TrainingSpec, load_spec


class JobService:
    """Submit, inspect and cancel jobs.

    Example::

        service = JobService(store, log_dir=Path(".jobworker/logs"), wake=scheduler.wake)
        job = service.submit(Path("configs/train/mlp_synthetic.yaml").read_text())
    """

    def __init__(
        self,
        store: JobStore,
        log_dir: Path,
        wake: Callable[[], None],
        python_path: Sequence[str] = (),
    ) -> None:
        self._store = store
        self._log_dir = log_dir
        self._wake = wake
        self._python_path = python_path  # where a job's entrypoint is looked for

    def submit(self, text: str) -> JobRecord:
        """Validate a YAML/JSON config and queue it; raises ``ConfigError`` storing nothing.

        An ``entrypoint`` must be found on the jobs' Python path; its module is
        read, never run, here.
        """
        job = self._store.create(self.validate(text), text)
        self._wake()
        return job

    def validate(self, text: str) -> TrainingSpec:
        """The config as a spec, or ``ConfigError`` naming each problem; nothing is stored."""
        return load_spec(text, self._python_path)

    def get(self, job_id: str) -> JobRecord:
        return self._store.get(job_id)

    def history(self, job_id: str) -> list[JobEvent]:
        return self._store.history(job_id)

    def list(self, states: list[JobState] | None = None, limit: int = 1000) -> list[JobRecord]:
        return self._store.find(states, limit)

    def cancel(self, job_id: str) -> JobRecord:
        """Ask for a job to be cancelled; a finished job is returned unchanged."""
        job = self._store.get(job_id)
        if not job.terminal and not job.cancel_requested:
            self._store.update(job_id, cancel_requested=True)
            self._wake()
            job = self._store.get(job_id)
        return job

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """Log text from byte ``offset`` on, and the offset to ask for next."""
        self._store.get(job_id)  # raises JobNotFound for an unknown id
        path = self._log_dir / f"{job_id}.log"
        if not path.exists():
            return "", offset
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
        return data.decode("utf-8", "replace"), offset + len(data)
