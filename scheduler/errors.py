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


class DeploymentNotFound(JobworkerError):
    """No deployment with that name."""


class PredictError(JobworkerError):
    """A prediction refused or failed; ``status`` is its HTTP status.

    422 the input does not match the model's signature; 429 overloaded
    (``retry_after_s`` set); 503 no ready replica, or the replica died while
    serving; 500 the model itself raised.
    """

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
