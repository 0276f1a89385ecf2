"""A job's attempts as the queue policy reads them, and the typed assignment.

Adds when the job last entered the queue (``queued_at``), when its current
attempt started (``attempt_started_at``), the GPU-seconds its ended attempts
ran (``attained_gpu_s``), and the reason of a preemption in progress in its own
column (``preempt_reason``, until now a key of the assignment). Rewrites each
stored assignment to its typed form: ``{"nodes": [{node_id, hostname,
gpu_indices, gpu_uuids, pid}, ...]}``, one entry per rank.

Revision ID: 0004
Revises: 0003
"""

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"

_NODE_KEYS = ("node_id", "hostname", "gpu_indices", "gpu_uuids", "pid")


def _typed(old: dict[str, Any]) -> dict[str, Any]:
    nodes = old.get("nodes") or [old]
    return {"nodes": [{k: n.get(k) for k in _NODE_KEYS} for n in nodes]}


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("preempt_reason", sa.Text, nullable=True))
        batch.add_column(sa.Column("queued_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("attempt_started_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("attained_gpu_s", sa.Float, nullable=False, server_default="0"))
    conn = op.get_bind()
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("submitted_at", sa.Float),
        sa.column("started_at", sa.Float),
        sa.column("assignment_json", sa.Text),
        sa.column("preempt_reason", sa.Text),
        sa.column("queued_at", sa.Float),
        sa.column("attempt_started_at", sa.Float),
    )
    query = sa.select(jobs.c.id, jobs.c.submitted_at, jobs.c.started_at, jobs.c.assignment_json)
    for row in conn.execute(query).all():
        values: dict[str, Any] = {
            "queued_at": row.submitted_at,
            "attempt_started_at": row.started_at,
        }
        if row.assignment_json:
            old = json.loads(row.assignment_json)
            values["assignment_json"] = json.dumps(_typed(old))
            values["preempt_reason"] = old.get("preempt_reason")
        conn.execute(jobs.update().where(jobs.c.id == row.id).values(**values))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("queued_at", existing_type=sa.Float, nullable=False)


def _untyped(new: dict[str, Any], preempt_reason: str | None) -> dict[str, Any]:
    nodes = new["nodes"]
    old: dict[str, Any] = {**nodes[0], "nodes": nodes}
    if preempt_reason:
        old["preempt_reason"] = preempt_reason
    return old


def downgrade() -> None:
    conn = op.get_bind()
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("assignment_json", sa.Text),
        sa.column("preempt_reason", sa.Text),
    )
    query = sa.select(jobs.c.id, jobs.c.assignment_json, jobs.c.preempt_reason)
    for row in conn.execute(query.where(jobs.c.assignment_json.is_not(None))).all():
        old = _untyped(json.loads(row.assignment_json), row.preempt_reason)
        conn.execute(
            jobs.update().where(jobs.c.id == row.id).values(assignment_json=json.dumps(old))
        )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attained_gpu_s")
        batch.drop_column("attempt_started_at")
        batch.drop_column("queued_at")
        batch.drop_column("preempt_reason")
