"""Errors raised by the worker side (GPU telemetry and the simulated cluster config).

The tree is small on purpose; the scheduler maps these to its own refusals::

    TelemetryError
    ├── NvmlUnavailable      NVML cannot start here (no library, no driver, mismatch)
    └── GpuLost              one device stopped answering (internal to a read)
    ClusterConfigError       a simulated-cluster YAML file is invalid (a ValueError)
    ModelUnavailable         a model to serve cannot be resolved or loaded from MLflow

Library errors (``pynvml.NVMLError``) never cross this boundary: the NVML
adapter translates them.
"""

from __future__ import annotations


class TelemetryError(Exception):
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


class ClusterConfigError(ValueError):
    """A simulated-cluster config is unreadable or invalid.

    The message names the file, the YAML line where known, and the field path,
    one problem per line, e.g.
    ``configs/cluster/x.yaml:7: nodes.1.gpus.0.memory_gb: Input should be greater than 0``.
    ``problems`` holds those lines without the file prefix.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class ModelUnavailable(Exception):
    """A model to serve cannot be found or loaded; the message names the URI and why."""
