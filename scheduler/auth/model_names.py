"""Which team owns each registered-model name: the first team to use it.

A job's ``register_as`` claims its name for the job's team in the same
transaction that stores the job; a deployment that follows an unclaimed name
claims it for the deployment's team. Names registered in MLflow outside
jobworker are unclaimed until then.

Example::

    names = ModelNames(engine)
    names.owner("mlp")  # "vision", or None when unclaimed
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa

from scheduler.db import model_names


class ModelNames:
    def __init__(self, engine: sa.Engine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def owner(self, name: str, conn: sa.Connection | None = None) -> str | None:
        query = sa.select(model_names.c.team).where(model_names.c.name == name)
        if conn is not None:
            return conn.execute(query).scalar_one_or_none()
        with self._engine.connect() as own:
            return own.execute(query).scalar_one_or_none()

    def claim(self, name: str, team: str, conn: sa.Connection | None = None) -> str:
        """Claim ``name`` for ``team`` unless claimed; the owner after. In ``conn``'s
        transaction when given (a claim racing another fails it on the primary key)."""
        if conn is None:
            with self._engine.begin() as own:
                return self.claim(name, team, own)
        owner = self.owner(name, conn)
        if owner is None:
            conn.execute(
                model_names.insert().values(name=name, team=team, claimed_at=self._clock())
            )
            return team
        return owner
