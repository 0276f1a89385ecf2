"""What the predictor reads of finished jobs: run time, who submitted, an index to list them.

``ran_s`` is the seconds a job's ended attempts ran (queueing and backoff
excluded), kept by the store as ``attained_gpu_s`` is; ``submitted_by`` the
name of the token that submitted it; ``predicted_s`` its run time as
predicted when it first started (how right the predictions of its family
were is what the predictive queue order trusts them by). Jobs stored before: a finished one's
``ran_s`` is its first start to its end (one attempt: exact), the others
count zero; ``submitted_by`` is unknown. The index on ``(state,
finished_at)`` lists the recent finished jobs without a scan.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("ran_s", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("submitted_by", sa.String(100), nullable=True))
        batch.add_column(sa.Column("predicted_s", sa.Float, nullable=True))
    jobs = sa.table(
        "jobs",
        sa.column("started_at", sa.Float),
        sa.column("finished_at", sa.Float),
        sa.column("ran_s", sa.Float),
    )
    op.execute(
        jobs.update()
        .where(jobs.c.started_at.is_not(None), jobs.c.finished_at.is_not(None))
        .values(ran_s=jobs.c.finished_at - jobs.c.started_at)
    )
    op.create_index("ix_jobs_state_finished_at", "jobs", ["state", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_finished_at", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("predicted_s")
        batch.drop_column("submitted_by")
        batch.drop_column("ran_s")
