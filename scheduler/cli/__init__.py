"""The ``jobworker`` command line (``scheduler.cli.main:app``)."""
