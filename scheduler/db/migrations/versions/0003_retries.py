"""Retries with backoff and preemption: when a job may be placed again, and why it came back.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("not_before", sa.Float, nullable=True))
        batch.add_column(sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("resume_reason", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resume_reason")
        batch.drop_column("preemptions")
        batch.drop_column("not_before")
