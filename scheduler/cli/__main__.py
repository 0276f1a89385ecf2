"""``python -m scheduler.cli``: the ``jobworker`` command line."""

from scheduler.cli.main import app

app()
