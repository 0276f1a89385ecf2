"""The replica interface: how the control plane starts, watches and stops inference replicas.

``workers/ray_replicas.py`` implements it on Ray; the data path to a ready
replica is ``workers/interface/channel.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI pinned to one version (or one run's artifact)."""

    uri: str  # what replicas load: models:/name/version or runs:/id/path
    name: str | None
    version: str | None
    run_id: str | None


@dataclass(frozen=True)
class ReplicaRequest:
    """One replica of one deployment, placed by the scheduler."""

    replica_id: str
    deployment: str
    model_uri: str  # pinned: models:/name/version or runs:/id/path
    tracking_uri: str
    node_id: str
    gpu_indices: tuple[int, ...]
    gpu_memory_bytes: int
    cpus: float
    max_batch_size: int
    python_path: tuple[str, ...] = ()
    simulated_usage_dir: str | None = None
    node_dir: str | None = None  # the node's state directory (workers/node_dir.py)
    serving_cores: int = 1  # the node's first cores serve: the replica is pinned to them
    allow_pickled_model: bool = False  # the deployment's: load a pickled model (runs its code)


class ReplicaPhase(StrEnum):
    STARTING = "STARTING"  # loading the model, warming up
    READY = "READY"  # serving on host:port
    FAILED = "FAILED"  # could not start (bad model, load error): do not retry as is
    DEAD = "DEAD"  # the actor died (crash, kill, node gone): replace it


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    phase: ReplicaPhase
    host: str | None = None
    port: int | None = None
    pid: int | None = None
    input_shape: tuple[int, ...] | None = None  # -1 for any size; None: no tensor signature
    input_dtype: str | None = None
    error: str | None = None
    secret: bytes | None = field(default=None, repr=False)  # what a channel client presents
    unix_path: str | None = None  # the channel's Unix socket, for a router on its machine


class ReplicaLauncher(Protocol):
    def start(self, request: ReplicaRequest) -> None:
        """Create the replica on ``request.node_id``; returns without waiting for it."""
        ...

    def poll(self, replica_ids: Sequence[str]) -> dict[str, ReplicaStatus]:
        """Each replica's phase; never blocks on a replica that is still starting."""
        ...

    def stop(self, replica_id: str) -> None:
        """Stop the replica and free what it holds."""
        ...
