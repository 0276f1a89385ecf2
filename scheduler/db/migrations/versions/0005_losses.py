"""Losses apart from failures: a lost worker is never the job's fault.

``losses`` counts attempts that ended because the worker, its node, Ray or the
control plane went away (requeued, never counted against ``max_retries``);
``failures`` counts attempts whose own process failed (retried up to
``max_retries``). Jobs stored before count zero of each.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("losses", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("failures", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("failures")
        batch.drop_column("losses")
