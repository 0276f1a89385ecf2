"""Deployment configs for the real-time inference lane: the pydantic schema and loading.

A deployment serves one MLflow model behind ``POST /v1/models/{name}/predict`` on a
pool of replicas. Loading never half-succeeds: either a valid :class:`DeploymentSpec`
comes back or a :class:`ConfigError` names every field path and rule that failed, e.g.
``batching.max_batch_size: Input should be less than or equal to 4096``.

Example::

    spec = load_deployment("name: mlp\\nmodel: models:/mlp@champion\\n")
    spec.model_ref().alias  # "champion"
    spec.tracks_alias  # True: replicas follow the alias when it moves
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from workers.interface.spec import (
    MAX_CPUS,
    MAX_GPU_MEMORY_GB,
    MAX_MEMORY_GB,
    Tags,
    parse_text,
    validate_config,
)
from workers.interface.telemetry import GIB

# The name is a URL path segment (/v1/models/{name}/predict) and a label value, so it is
# kept lower-case and DNS-ish.
_DEPLOYMENT_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_TEAM = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # as workers.interface.spec's team

_REGISTERED = r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
_MODEL_URI_FORMS: tuple[tuple[Literal["alias", "version", "run"], re.Pattern[str]], ...] = (
    ("alias", re.compile(rf"models:/{_REGISTERED}@(?P<alias>[A-Za-z0-9_-]+)")),
    ("version", re.compile(rf"models:/{_REGISTERED}/(?P<version>[1-9][0-9]*)")),
    ("run", re.compile(r"runs:/(?P<run_id>[A-Za-z0-9]+)/(?P<path>[^\s]+)")),
)
_MODEL_URI_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION (VERSION a positive integer) or runs:/RUN_ID/PATH"
)


@dataclass(frozen=True)
class ModelUri:
    """A parsed MLflow model URI; the fields that do not apply to ``kind`` are ``None``.

    Example::

        parse_model_uri("models:/mlp@champion")
        # ModelUri(kind="alias", name="mlp", alias="champion", version=None, ...)
    """

    kind: Literal["alias", "version", "run"]
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    path: str | None = None


def parse_model_uri(uri: str) -> ModelUri:
    """Parse one of the three accepted model URI forms; ``ValueError`` names them otherwise."""
    for kind, pattern in _MODEL_URI_FORMS:
        match = pattern.fullmatch(uri)
        if match is not None:
            return ModelUri(kind=kind, **match.groupdict())
    raise ValueError(f"expected one of {_MODEL_URI_HELP}; got {uri!r}")


MAX_REPLICAS = 256  # per deployment
MAX_QUEUE = 100_000  # waiting requests per deployment


class _Strict(BaseModel):
    # workers.interface.spec's base, plus: YAML's .inf/.nan are never a sensible latency or size.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Replicas(_Strict):
    """How many replicas the autoscaler may run; ``max`` defaults to ``min`` (a fixed pool)."""

    min: int = Field(default=1, ge=1, le=MAX_REPLICAS, description=f"At most {MAX_REPLICAS}.")
    max: int = Field(default=1, ge=1, le=MAX_REPLICAS, description=f"At most {MAX_REPLICAS}.")

    @model_validator(mode="before")
    @classmethod
    def _max_defaults_to_min(cls, data: Any) -> Any:
        # `replicas: {min: 3}` means three replicas, not "min 3, max 1" and an error.
        if isinstance(data, dict) and "max" not in data and isinstance(data.get("min"), int):
            return {**data, "max": data["min"]}
        return data

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min")  # absent when min itself failed
        if low is not None and value < low:
            raise ValueError(f"max ({value}) must be at least min ({low})")
        return value


class ServeResources(_Strict):
    """What one replica needs. A GPU share is asked for by memory or by fraction, not both;
    asking for neither gives a CPU-only replica."""

    gpu_memory_gb: float | None = Field(
        default=None, gt=0, le=MAX_GPU_MEMORY_GB, description=f"At most {MAX_GPU_MEMORY_GB:g}."
    )
    gpu_fraction: float | None = Field(default=None, gt=0, le=1)
    cpus: float = Field(default=1.0, gt=0, le=MAX_CPUS, description=f"At most {MAX_CPUS}.")
    memory_gb: float = Field(
        default=1.0, gt=0, le=MAX_MEMORY_GB, description=f"At most {MAX_MEMORY_GB:g}."
    )
    gpu_type: str | None = None

    @model_validator(mode="after")
    def _one_gpu_share(self) -> Self:
        if self.gpu_memory_gb is not None and self.gpu_fraction is not None:
            raise ValueError("set at most one of gpu_memory_gb and gpu_fraction")
        if self.gpu_type is not None and self.gpus == 0:
            raise ValueError(
                "gpu_type is set but no GPU is requested: set gpu_memory_gb or gpu_fraction"
            )
        return self

    @property
    def gpus(self) -> int:
        """1 when the replica shares a GPU, 0 for a CPU-only replica."""
        return 0 if self.gpu_memory_gb is None and self.gpu_fraction is None else 1

    def gpu_memory_bytes(self, gpu_total_bytes: int | None) -> int:
        """The GPU memory one replica reserves on a GPU of ``gpu_total_bytes``.

        ``gpu_memory_gb`` is absolute (rounded up to a byte, never reserving less than
        asked); ``gpu_fraction`` is rounded down, so four replicas of 0.25 fit one GPU
        exactly. A fraction of a GPU whose total is unknown (``None``) cannot be resolved
        and raises ``ValueError``: placement must treat that GPU as not eligible.

        Example::

            ServeResources(gpu_fraction=0.25).gpu_memory_bytes(8 * GIB)  # 2 * GIB
        """
        if self.gpu_memory_gb is not None:
            return math.ceil(self.gpu_memory_gb * GIB)
        if self.gpu_fraction is None:
            return 0
        if gpu_total_bytes is None:
            raise ValueError("gpu_fraction needs the GPU's total memory, which is unknown")
        return math.floor(self.gpu_fraction * gpu_total_bytes)


class Batching(_Strict):
    """Dynamic batching. With ``max_wait_ms`` 0 an idle replica takes whatever is queued
    at once (up to ``max_batch_size``); above 0 a partial batch may wait up to that long
    to fill, and only while the replica is idle."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=0.0, ge=0, le=1000)


class Slo(_Strict):
    """The latency objective the autoscaler defends (end to end, queueing included)."""

    p99_ms: float = Field(default=100.0, gt=0, le=600_000, description="At most 10 minutes.")


class Autoscaling(_Strict):
    """When to change the replica count; the rules are in :mod:`scheduler.core.autoscale`."""

    target_queue_per_replica: float = Field(default=8.0, gt=0, le=MAX_QUEUE)
    upscale_delay_s: float = Field(default=2.0, ge=0, le=86_400, description="At most a day.")
    downscale_delay_s: float = Field(default=30.0, ge=0, le=86_400, description="At most a day.")


class DeploymentSpec(_Strict):
    """A model deployment as the user submits it (``configs/serve/*.yaml``).

    ``priority`` orders deployments *within* the real-time lane (who gets reserved
    capacity first when it is short), on the training configs' -100..100 scale. The
    real-time lane as a whole outranks the batch lane whatever the numbers: growing a
    deployment may preempt the lowest-priority batch job, never the reverse.

    Example::

        spec = load_deployment(
            "name: mlp\\nmodel: models:/mlp/3\\nresources: {gpu_fraction: 0.25}\\n"
        )
        spec.model_ref().version  # "3"
        spec.resources.gpus  # 1
    """

    name: str = Field(pattern=_DEPLOYMENT_NAME)
    model: str
    replicas: Replicas = Field(default_factory=Replicas)
    resources: ServeResources = Field(default_factory=ServeResources)
    batching: Batching = Field(default_factory=Batching)
    slo: Slo = Field(default_factory=Slo)
    max_queue: int = Field(
        default=256,
        ge=1,
        le=MAX_QUEUE,
        description=f"Waiting requests beyond this get 429; at most {MAX_QUEUE:,}.",
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    priority: int = Field(default=100, ge=-100, le=100)
    team: str | None = Field(default=None, pattern=_TEAM)
    tags: Tags = Field(default_factory=dict)
    # Load a pickled model (or one that ships code): its unpickling runs whatever it names.
    allow_pickled_model: bool = False

    @field_validator("model")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        parse_model_uri(value)
        return value

    @model_validator(mode="after")
    def _batch_wait_within_slo(self) -> Self:
        # A partial batch allowed to wait as long as the whole latency budget breaks the
        # SLO on every quiet period, before the model even runs.
        if self.batching.max_wait_ms >= self.slo.p99_ms:
            raise ValueError(
                f"batching.max_wait_ms ({self.batching.max_wait_ms:g}) must be below "
                f"slo.p99_ms ({self.slo.p99_ms:g})"
            )
        return self

    def model_ref(self) -> ModelUri:
        """The parsed ``model`` URI."""
        return parse_model_uri(self.model)

    @property
    def tracks_alias(self) -> bool:
        """True for ``models:/NAME@ALIAS``: the deployment follows the alias when it moves."""
        return self.model_ref().kind == "alias"


def deployment_from_data(data: Any) -> DeploymentSpec:
    """Validate already-parsed data into a deployment, or raise :class:`ConfigError`."""
    return validate_config(DeploymentSpec, data, "a deployment config")


def load_deployment(text: str) -> DeploymentSpec:
    """Parse and validate a YAML or JSON deployment config."""
    return deployment_from_data(parse_text(text))
