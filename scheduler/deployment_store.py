"""Deployments as stored: the spec a user sent and the state the controller last saw.

Shares the job store's database (and its migrations). Replicas are not
stored: they belong to the running control plane and are started afresh from
these rows when it restarts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from scheduler.errors import DeploymentNotFound
from scheduler.store import Clock, JobStore
from scheduler.tables import deployments


class DeploymentState(StrEnum):
    DEPLOYING = "DEPLOYING"  # no replica serving yet
    READY = "READY"  # every replica serving the target model version
    UPDATING = "UPDATING"  # rolling onto a new model version or spec
    FAILED = "FAILED"  # the model cannot be resolved or loaded; see the message


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    spec: dict[str, Any]
    source_text: str
    state: DeploymentState
    message: str | None
    model_version: str | None
    run_id: str | None
    created_at: float
    updated_at: float


def _record(row: sa.Row[Any]) -> DeploymentRecord:
    data = dict(row._mapping)
    data["spec"] = json.loads(data.pop("spec_json"))
    data["state"] = DeploymentState(data["state"])
    return DeploymentRecord(**data)


class DeploymentStore:
    """Create, read, update and delete deployment rows.

    Example::

        deployments = DeploymentStore(job_store)
        deployments.put("mlp", spec_dict, yaml_text)
    """

    def __init__(self, jobs: JobStore, clock: Clock | None = None) -> None:
        self._engine = jobs.engine
        self._clock = clock or jobs.clock

    def put(
        self, name: str, spec: dict[str, Any], source_text: str
    ) -> tuple[DeploymentRecord, bool]:
        """Create the deployment, or replace its spec; returns it and whether it is new."""
        now = self._clock()
        with self._engine.begin() as conn:
            exists = conn.execute(
                sa.select(deployments.c.name).where(deployments.c.name == name)
            ).first()
            values = {"spec_json": json.dumps(spec), "source_text": source_text, "updated_at": now}
            if exists:
                conn.execute(
                    deployments.update().where(deployments.c.name == name).values(**values)
                )
            else:
                conn.execute(
                    deployments.insert().values(
                        name=name, state=DeploymentState.DEPLOYING.value, created_at=now, **values
                    )
                )
        return self.get(name), not exists

    def get(self, name: str) -> DeploymentRecord:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(deployments).where(deployments.c.name == name)).first()
        if row is None:
            raise DeploymentNotFound(f"no deployment named {name!r}")
        return _record(row)

    def list(self) -> list[DeploymentRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(deployments).order_by(deployments.c.name)).all()
        return [_record(r) for r in rows]

    def delete(self, name: str) -> None:
        with self._engine.begin() as conn:
            result = conn.execute(deployments.delete().where(deployments.c.name == name))
        if result.rowcount == 0:
            raise DeploymentNotFound(f"no deployment named {name!r}")

    def set_status(
        self,
        name: str,
        state: DeploymentState,
        message: str | None,
        model_version: str | None,
        run_id: str | None,
    ) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                deployments.update()
                .where(deployments.c.name == name)
                .values(
                    state=state.value,
                    message=message,
                    model_version=model_version,
                    run_id=run_id,
                    updated_at=self._clock(),
                )
            )
