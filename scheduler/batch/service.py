"""The job service: what the API and the CLI can ask of the control plane.

It validates and stores, reads, and flags; it never launches or stops a
worker itself — the loop does, on its next pass (woken at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import sqlalchemy as sa

from scheduler.auth.identity import (
    Identity,
    PriorityCaps,
    acting_team,
    check_can_mutate,
    check_model_name,
    check_owner,
    check_priority,
)
from scheduler.auth.model_names import ModelNames
from scheduler.batch.demands import spec_demand
from scheduler.batch.store import JobEvent, JobRecord, JobStore
from scheduler.core.admission import never_fits
from scheduler.core.model import PlacementPolicy
from scheduler.core.states import JobState
from workers.interface.errors import ConfigError
from workers.interface.spec import TrainingSpec, load_spec
from workers.interface.telemetry import NodeReading

log = logging.getLogger(__name__)

# The config field each of a demand's fields comes from (scheduler.core.admission).
_SPEC_FIELDS = {
    "nodes": "resources.nodes",
    "gpus": "resources.gpus",
    "gpu_memory_bytes": "resources.gpu_memory_gb",
    "gpu_type": "resources.gpu_type",
    "cpus": "resources.cpus",
    "memory_bytes": "resources.memory_gb",
}


class JobService:
    """Submit, inspect and cancel jobs.

    Example::

        service = JobService(store, Path(".jobworker/logs"), scheduler.wake, ModelNames(engine))
        job = service.submit(Path("configs/train/mlp_synthetic.yaml").read_text(), caller)
    """

    def __init__(
        self,
        store: JobStore,
        log_dir: Path,
        wake: Callable[[], None],
        model_names: ModelNames,
        python_path: Sequence[str] = (),
        priority_caps: PriorityCaps = PriorityCaps(),
        nodes: Callable[[], Sequence[NodeReading]] = tuple,
        placement_policy: PlacementPolicy = PlacementPolicy(),
    ) -> None:
        self._store = store
        self._nodes = nodes  # the cluster's nodes as their agents last reported them
        self._placement_policy = placement_policy
        self._model_names = model_names
        self._priority_caps = priority_caps
        self._log_dir = log_dir
        self._wake = wake
        self._python_path = python_path  # where a job's entrypoint is looked for

    def submit(self, text: str, caller: Identity, queue_anyway: bool = False) -> JobRecord:
        """Validate a YAML/JSON config and queue it for ``caller``'s team; raises
        ``ConfigError`` or ``Forbidden`` storing nothing.

        The job's team is the token's (an admin may name any); its priority must be
        within the team's cap; its ``register_as`` name is claimed for the team, or
        refused when another team owns it. An ``entrypoint`` must be found on the
        jobs' Python path; its module is read, never run, here. A job no node of the
        cluster could ever hold is refused, naming the fields and each node's
        reason, unless ``queue_anyway`` (it waits for nodes yet to join).
        """
        spec = self.validate(text)
        check_can_mutate(caller, "submit jobs")
        team = acting_team(caller, spec.team if "team" in spec.model_fields_set else None)
        problem = check_priority(caller, team, spec.priority, self._priority_caps)
        if problem is not None:
            raise ConfigError([("priority", problem)])
        if not queue_anyway:
            self._check_fits(spec)
        spec = spec.model_copy(update={"team": team})
        name = spec.register_as

        def claim(conn: sa.Connection) -> None:
            if name is not None:
                check_model_name(caller, self._model_names.owner(name, conn), team, name)
                self._model_names.claim(name, team, conn)

        job = self._store.create(spec, text, in_tx=claim, submitted_by=caller.name)
        self._wake()
        return job

    def _check_fits(self, spec: TrainingSpec) -> None:
        """Refuse a job that no node could hold were the cluster empty (see
        :mod:`scheduler.core.admission`); with no node reported yet, accept it."""
        nodes = self._nodes()
        if not nodes:
            log.info("job %r accepted unchecked: no node has reported yet", spec.name)
            return
        refusal = never_fits(nodes, spec_demand(spec.name, spec), self._placement_policy)
        if refusal is None:
            return
        summary = (
            "no node of the cluster could ever hold this job, even with nothing else "
            "running; to wait for nodes yet to join, queue it anyway "
            "(jobworker submit --queue-anyway; POST /jobs?queue_anyway=true)"
        )
        fields = [_SPEC_FIELDS[f] for f in refusal.fields] or ["resources"]
        raise ConfigError(
            [(f, summary) for f in fields] + [("resources", r) for r in refusal.reasons]
        )

    def validate(self, text: str) -> TrainingSpec:
        """The config as a spec, or ``ConfigError`` naming each problem; nothing is stored."""
        return load_spec(text, self._python_path)

    def get(self, job_id: str) -> JobRecord:
        return self._store.get(job_id)

    def history(self, job_id: str) -> list[JobEvent]:
        return self._store.history(job_id)

    def list(self, states: list[JobState] | None = None, limit: int = 1000) -> list[JobRecord]:
        return self._store.find(states, limit)

    def cancel(self, job_id: str, caller: Identity) -> JobRecord:
        """Ask for a job to be cancelled; a finished job is returned unchanged. Only its
        team's members (or an admin) may."""
        job = self._store.get(job_id)
        check_owner(caller, job.team, f"job {job_id}", "cancel")
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
