"""Alembic environment: runs migrations on the connection the job store hands over."""

from alembic import context

from scheduler.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
