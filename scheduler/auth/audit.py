"""The audit trail: one row per mutating request (refusals included), read back filtered.

Example::

    audit = AuditStore(engine)
    audit.record(AuditEvent(at=time.time(), token_id="a1b2", ..., status=201))
    audit.find(team="vision", limit=50)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from scheduler.db import audit_events


@dataclass(frozen=True)
class AuditEvent:
    """Who (token id and name; None without a valid token), their team and role, what
    (method, path, target), when (``at``, epoch seconds) and the answer's status."""

    at: float
    token_id: str | None
    token_name: str | None
    team: str | None
    role: str | None
    method: str
    path: str
    target: str | None
    status: int
    id: int | None = None


class AuditStore:
    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def record(self, event: AuditEvent) -> None:
        values = asdict(event)
        del values["id"]
        with self._engine.begin() as conn:
            conn.execute(audit_events.insert().values(**values))

    def find(
        self,
        *,
        team: str | None = None,
        token_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[AuditEvent]:
        """Events newest first, narrowed by team, token and time."""
        query = sa.select(audit_events).order_by(audit_events.c.id.desc()).limit(limit)
        if team is not None:
            query = query.where(audit_events.c.team == team)
        if token_id is not None:
            query = query.where(audit_events.c.token_id == token_id)
        if since is not None:
            query = query.where(audit_events.c.at >= since)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_event(r) for r in rows]


def _event(row: sa.Row[Any]) -> AuditEvent:
    return AuditEvent(**dict(row._mapping))
