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


class Text(sa.TypeDecorator[str]):
    """Text as every backend can store it: a NUL becomes U+FFFD.

    PostgreSQL's text cannot hold a NUL, and an error message or a reason may carry one
    from user code; refused, it would leave the job unable to reach its end. SQLite could
    keep it, but both backends read back the same. The schema type is plain ``TEXT``.
    """

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        return value.replace("\x00", "\ufffd") if value is not None else None


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("experiment", sa.String(200), nullable=False),
    sa.Column("team", sa.String(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("spec_json", Text, nullable=False),
    sa.Column("source_text", Text, nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("assignment_json", Text, nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("model_version", sa.String(32), nullable=True),
    sa.Column("error", Text, nullable=True),
    sa.Column("progress_json", Text, nullable=True),
    sa.Column("pending_reasons_json", Text, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"),
    sa.Column("resume_reason", Text, nullable=True),
    sa.Column("preempt_reason", Text, nullable=True),
    sa.Column("queued_at", sa.Float, nullable=False),
    sa.Column("attempt_started_at", sa.Float, nullable=True),
    sa.Column("attained_gpu_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("losses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_generation", sa.Integer, nullable=True),  # of the leader that placed it
    sa.Column("ran_s", sa.Float, nullable=False, server_default="0"),  # by its ended attempts
    sa.Column("submitted_by", sa.String(100), nullable=True),  # the submitting token's name
    sa.Column("predicted_s", sa.Float, nullable=True),  # its run time as predicted at its start
    sa.Index("ix_jobs_state_finished_at", "state", "finished_at"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("reason", Text, nullable=False),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("spec_json", Text, nullable=False),
    sa.Column("source_text", Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("message", Text, nullable=True),
    sa.Column("model_version", sa.String(32), nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# The model versions a deployment has served, in order: what a rollback returns to.
deployment_versions = sa.Table(
    "deployment_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, index=True),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("served_at", sa.Float, nullable=False),
)


leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)


tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("team", sa.String(100), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("kdf", sa.String(64), nullable=False),  # how secret_hash was derived
    sa.Column("salt", sa.String(64), nullable=False),
    sa.Column("secret_hash", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(32), nullable=True),  # the token that made it
    sa.Column("revoked_at", sa.Float, nullable=True),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("token_id", sa.String(32), nullable=True),  # None: no valid token
    sa.Column("token_name", sa.String(100), nullable=True),
    sa.Column("team", sa.String(100), nullable=True),
    sa.Column("role", sa.String(16), nullable=True),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("path", Text, nullable=False),
    sa.Column("target", Text, nullable=True),
    sa.Column("status", sa.Integer, nullable=False),
)

model_names = sa.Table(
    "model_names",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("team", sa.String(100), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# pg_advisory_xact_lock's key for the schema upgrade: any constant all versions share.
_MIGRATION_LOCK = 0x6A6F62776F726B  # "jobwork"


def connect(url: str) -> sa.Engine:
    """An engine on ``url`` whose schema has been upgraded to the newest migration.

    SQLite gets its pragmas on every connection; a server database (PostgreSQL) a
    pool that tests each connection before handing it out, so one the server or the
    network dropped meanwhile is replaced, not handed to the loop to fail a pass.
    """
    if sa.make_url(url).get_backend_name() == "sqlite":
        engine = sa.create_engine(url)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Control planes starting together on one new database (a leader and its
            # standby) would all create the tables: one at a time, the others find them.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
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
