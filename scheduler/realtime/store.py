"""Deployments as stored: the spec a user sent and the state the controller last saw.

Shares the control plane's database (``scheduler.db``) with the job store.
Replicas are not stored: they belong to the running control plane and are
started afresh from these rows when it restarts. :meth:`DeploymentStore.transition`
is the one place that changes a deployment's state, checked against
:func:`scheduler.core.states.check_deployment_transition`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from scheduler.core.states import DeploymentState, check_deployment_transition
from scheduler.db import deployment_versions, deployments
from scheduler.realtime.spec import DeploymentSpec
from workers.interface.errors import DeploymentNotFound


@dataclass(frozen=True)
class DeploymentRecord:
    """A deployment row: the typed spec, and what the controller last reported."""

    name: str
    spec: DeploymentSpec
    source_text: str
    state: DeploymentState
    message: str | None
    model_version: str | None
    run_id: str | None
    created_at: float
    updated_at: float


@functools.lru_cache(maxsize=1024)
def _stored_spec(spec_json: str) -> DeploymentSpec:
    """A stored spec re-read as the model (memoised: the controller reads every row each pass)."""
    return DeploymentSpec.model_validate_json(spec_json)


def _record(row: sa.Row[Any]) -> DeploymentRecord:
    d = row._mapping
    return DeploymentRecord(
        name=d["name"],
        spec=_stored_spec(d["spec_json"]),
        source_text=d["source_text"],
        state=DeploymentState(d["state"]),
        message=d["message"],
        model_version=d["model_version"],
        run_id=d["run_id"],
        created_at=d["created_at"],
        updated_at=d["updated_at"],
    )


class DeploymentStore:
    """Create, read, update and delete deployment rows.

    Example::

        deployments = DeploymentStore(engine)
        deployments.put(load_deployment(yaml_text), yaml_text)
    """

    def __init__(self, engine: sa.Engine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def put(self, spec: DeploymentSpec, source_text: str) -> tuple[DeploymentRecord, bool]:
        """Create the deployment, or replace its spec; returns it and whether it is new."""
        now = self._clock()
        name = spec.name
        with self._engine.begin() as conn:
            exists = conn.execute(
                sa.select(deployments.c.name).where(deployments.c.name == name)
            ).first()
            values = {
                "spec_json": spec.model_dump_json(),
                "source_text": source_text,
                "updated_at": now,
            }
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
        """Forget the deployment and the versions it served."""
        with self._engine.begin() as conn:
            result = conn.execute(deployments.delete().where(deployments.c.name == name))
            conn.execute(deployment_versions.delete().where(deployment_versions.c.name == name))
        if result.rowcount == 0:
            raise DeploymentNotFound(f"no deployment named {name!r}")

    def transition(
        self,
        name: str,
        state: DeploymentState,
        message: str | None,
        model_version: str | None,
        run_id: str | None,
    ) -> None:
        """Record what the controller sees: a new state goes through the state machine.

        The same state with a new message, version or run id is an update, not
        a transition. A version other than the last one served is added to the
        versions served (:meth:`previous_version`). Raises
        :class:`IllegalTransition` for a move the machine forbids, leaving the row
        untouched; a deployment deleted meanwhile is left deleted.
        """
        with self._engine.begin() as conn:
            row = conn.execute(
                sa.select(deployments.c.state).where(deployments.c.name == name)
            ).first()
            if row is None:
                return
            current = DeploymentState(row.state)
            if state is not current:
                check_deployment_transition(current, state)
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
            if model_version is not None and model_version != _last_served(conn, name):
                conn.execute(
                    deployment_versions.insert().values(
                        name=name, model_version=model_version, served_at=self._clock()
                    )
                )

    def previous_version(self, name: str) -> str | None:
        """The model version the deployment served before the one it serves now (None: none).

        After a rollback the version rolled back from is the previous one again.
        """
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(deployment_versions.c.model_version)
                .where(deployment_versions.c.name == name)
                .order_by(deployment_versions.c.id.desc())
            ).all()
        current = rows[0].model_version if rows else None
        return next((r.model_version for r in rows if r.model_version != current), None)


def _last_served(conn: sa.Connection, name: str) -> str | None:
    return conn.execute(
        sa.select(deployment_versions.c.model_version)
        .where(deployment_versions.c.name == name)
        .order_by(deployment_versions.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()
