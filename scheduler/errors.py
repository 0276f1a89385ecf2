"""One error tree for the control plane; adapters translate library errors into it."""

from __future__ import annotations


class JobworkerError(Exception):
    """Base of every error jobworker raises on purpose."""


class ConfigError(JobworkerError):
    """A config was refused. ``errors`` holds one ``(field_path, message)`` per problem."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors))


class JobNotFound(JobworkerError):
    """No job with that id."""


class IllegalTransition(JobworkerError):
    """A job state change that the state machine does not allow."""


class WorkerLost(JobworkerError):
    """The worker running a job disappeared (actor died, node gone)."""
