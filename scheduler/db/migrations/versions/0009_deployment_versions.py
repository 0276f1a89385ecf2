"""The model versions each deployment has served, oldest first: what a rollback returns to.

A row is added when a deployment's replicas first serve a version other than the
last one recorded; undeploying forgets the deployment's rows. Deployments stored
before start with none (their current version is recorded on the next report).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.create_table(
        "deployment_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("served_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployment_versions")
