"""The values the router and the deployment controller exchange (no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RouteConfig:
    """What the router needs of a deployment."""

    name: str
    max_batch_size: int
    max_wait_ms: float
    slo_p99_ms: float
    max_queue: int
    request_timeout_s: float = 30.0


@dataclass(frozen=True)
class ReplicaEndpoint:
    """A ready replica, the model version it serves and its input schema."""

    replica_id: str
    host: str
    port: int
    model_name: str
    model_version: str | None
    run_id: str | None
    input_shape: tuple[int, ...] | None
    input_dtype: str | None


@dataclass(frozen=True)
class RouteLoad:
    """A deployment's load, as the autoscaler reads it."""

    queue_depth: int
    in_flight: int
    p99_ms: float | None
    ready_replicas: int


@dataclass(frozen=True)
class Prediction:
    outputs: np.ndarray
    endpoint: ReplicaEndpoint
