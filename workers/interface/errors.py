"""jobworker's one error tree, shared by the control plane and the workers.

Every error jobworker raises on purpose derives from :class:`JobworkerError`;
adapters translate library errors at the boundary (``pynvml.NVMLError`` →
:class:`NvmlUnavailable`, ``MlflowException`` → :class:`ModelUnavailable`,
``RayActorError`` → a lost worker), so nothing above them sees a library's
exception type::

    JobworkerError
    ├── ConfigError            a config was refused; one (field path, message) per problem
    │   └── ClusterConfigError a simulated-cluster YAML file is invalid (names file and line)
    ├── JobNotFound            no job with that id
    ├── DeploymentNotFound     no deployment with that name
    ├── IllegalTransition      a state change the state machine does not allow
    ├── NotLeader              this control plane no longer holds the leader lease
    ├── PredictError           a prediction refused or failed, with its HTTP status
    ├── ModelUnavailable       a model to serve cannot be resolved or loaded from MLflow
    ├── MlflowRefused          MLflow refused a job's call for good (not an outage)
    ├── CheckpointRefused      a checkpoint holds more than tensors and plain values
    ├── ReplicaGone            a replica's connection closed before it answered
    ├── ReplicaFailed          a replica answered a batch with an error
    ├── ServiceError           a service `jobworker up` needs cannot start (a taken port, ...)
    └── TelemetryError         a GPU backend could not produce a reading
        ├── NvmlUnavailable    NVML cannot start here (no library, no driver, mismatch)
        └── GpuLost            one device stopped answering (internal to a read)
"""

from __future__ import annotations


class JobworkerError(Exception):
    """Base of every error jobworker raises on purpose."""


class ConfigError(JobworkerError, ValueError):
    """A config was refused. ``errors`` holds one ``(field_path, message)`` per problem.

    >>> str(ConfigError([("resources.gpus", "must be >= 0")]))
    'resources.gpus: must be >= 0'
    """

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors))


class ClusterConfigError(ConfigError):
    """A simulated-cluster config is unreadable or invalid.

    The message names the file, the YAML line where known, and the field path,
    one problem per line, e.g.
    ``configs/cluster/x.yaml:7: nodes.1.gpus.0.memory_gb: Input should be greater than 0``.
    ``problems`` holds those lines without the file prefix.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__([("", line) for line in problems] or [("", message)])
        self.args = (message,)  # str() is the whole message, file and lines included
        self.problems = problems


class JobNotFound(JobworkerError):
    """No job with that id."""


class DeploymentNotFound(JobworkerError):
    """No deployment with that name."""


class NothingToRollBack(JobworkerError):
    """A rollback of a deployment that has served no other registered model version."""


class IllegalTransition(JobworkerError):
    """A job or deployment state change that its state machine does not allow."""


class NotLeader(JobworkerError):
    """This control plane no longer holds the leader lease: it must not act on jobs."""


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


class ModelUnavailable(JobworkerError):
    """A model to serve cannot be found or loaded; the message names the URI and why."""


class MlflowRefused(JobworkerError):
    """MLflow refused a call for good (HTTP 4xx, or data it cannot take): retrying cannot help."""


class CheckpointRefused(JobworkerError):
    """A checkpoint cannot be loaded with ``torch.load(weights_only=True)``: it holds objects
    whose unpickling could run code; the message names the first one."""


class ReplicaGone(JobworkerError, ConnectionError):
    """The replica closed the connection (it died or was stopped) before answering."""


class ReplicaFailed(JobworkerError):
    """The replica answered with an error (its message is the exception text)."""


class ServiceError(JobworkerError):
    """A service ``jobworker up`` runs or needs cannot start; the message says who holds what."""


class TelemetryError(JobworkerError):
    """A GPU backend could not produce a reading."""


class NvmlUnavailable(TelemetryError):
    """NVML cannot be used on this machine: library missing, driver not loaded, init failed.

    ``code`` is the NVML return code when the driver gave one (e.g. 12 for
    ``NVML_ERROR_LIBRARY_NOT_FOUND``), ``None`` when ``pynvml`` itself is missing.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class GpuLost(TelemetryError):
    """A device answered ``GPU_IS_LOST`` (or an equivalent fatal code) to a call.

    The NVML backend catches this inside ``read()`` and reports the device as
    ``available=False``; it only escapes to callers of the adapter's internals.
    """

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed with NVML error {code}: the GPU stopped answering")
        self.call = call
        self.code = code
