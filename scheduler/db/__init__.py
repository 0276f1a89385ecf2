"""The control plane's database: its tables, and an engine on them with the schema migrated.

SQLite (WAL) by default, PostgreSQL by URL. The job store
(``scheduler.batch.store``) and the deployment store
(``scheduler.realtime.store``) share one engine; the schema is created and
upgraded by the Alembic migrations in ``migrations/`` when :func:`connect` opens it.

Example::

    engine = connect("sqlite:///.jobworker/jobs.db")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("experiment", sa.String(200), nullable=False),
    sa.Column("team", sa.String(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("source_text", sa.Text, nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("assignment_json", sa.Text, nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("model_version", sa.String(32), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("progress_json", sa.Text, nullable=True),
    sa.Column("pending_reasons_json", sa.Text, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"),
    sa.Column("resume_reason", sa.Text, nullable=True),
    sa.Column("preempt_reason", sa.Text, nullable=True),
    sa.Column("queued_at", sa.Float, nullable=False),
    sa.Column("attempt_started_at", sa.Float, nullable=True),
    sa.Column("attained_gpu_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("losses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_generation", sa.Integer, nullable=True),  # of the leader that placed it
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("source_text", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=True),
    sa.Column("model_version", sa.String(32), nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def connect(url: str) -> sa.Engine:
    """An engine on ``url`` whose schema has been upgraded to the newest migration."""
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets the API read while the loop writes; busy_timeout rides out short locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
