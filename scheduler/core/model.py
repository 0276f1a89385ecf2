"""The core's value types: what placement and the queue policy take in and give back.

Frozen and behaviour-free (a few derived properties aside), so any part of
``scheduler/`` can build, compare and pass them around; no I/O, no clock.

* Placement: :class:`Demand` (what a job or replica asks for), :class:`Holding`
  (what the scheduler already handed out), :class:`ClusterSnapshot` (telemetry
  plus holdings), :class:`PlacementPolicy`, and the outcome,
  :class:`Decision` with its :class:`NodePlacement` per node.
* Queue policy: :class:`QueuedJob`, :class:`RunningJob`, :class:`QueuePolicy`,
  and the outcome, :class:`QueuePlan` with its :class:`Reservation`.

What the stores keep (``JobRecord``, ``DeploymentRecord``) lives with each store;
``scheduler.batch.demands`` turns a job record into these values.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from workers.interface.telemetry import GpuUuid, NodeReading

RANK_STEP = 64
"""Rank units per priority level; LAS queues are single units below one level."""

Mode = Literal["fifo", "sjf", "las", "srpt", "predictive"]
MODES: tuple[Mode, ...] = ("fifo", "sjf", "las", "srpt", "predictive")


@functools.lru_cache(maxsize=1024)
def type_alternatives(gpu_type: str | None) -> tuple[str, ...]:
    """Split ``"H100|A100"`` into lower-case alternatives; ``()`` means any type.

    Memoised: every demand's validation asks, and a queue names few types.
    """
    if gpu_type is None:
        return ()
    return tuple(alt.strip().lower() for alt in gpu_type.split("|") if alt.strip())


@dataclass(frozen=True, slots=True)
class Demand:
    """One job's (or one replica's) request, per node.

    ``gpus`` GPUs on each of ``nodes`` distinct nodes, each GPU with at least
    ``gpu_memory_bytes`` effective free memory; ``cpus`` and ``memory_bytes``
    of host resources on each node. ``gpu_type`` lists alternatives
    (``"H100|A100"``) matched case-insensitively as substrings of the GPU name.
    ``shared`` (real-time replicas, ``gpus == 1``) may share a GPU by memory.

    >>> Demand("train-7", gpus=2, gpu_memory_bytes=40 * 2**30, cpus=8, memory_bytes=2**36)
    ... # doctest: +ELLIPSIS
    Demand(job_id='train-7', gpus=2, ...)
    """

    job_id: str
    gpus: int
    gpu_memory_bytes: int
    cpus: float
    memory_bytes: int
    gpu_type: str | None = None
    nodes: int = 1
    shared: bool = False

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.gpu_memory_bytes < 0 or self.cpus < 0 or self.memory_bytes < 0:
            raise ValueError(f"demand {self.job_id}: resources must not be negative")
        if self.nodes < 1:
            raise ValueError(f"demand {self.job_id}: nodes must be at least 1, got {self.nodes}")
        if self.shared and self.gpus != 1:
            raise ValueError(f"demand {self.job_id}: a shared demand takes exactly 1 GPU")
        if self.gpu_type is not None and not type_alternatives(self.gpu_type):
            raise ValueError(f"demand {self.job_id}: gpu_type {self.gpu_type!r} names no type")


@dataclass(frozen=True, slots=True)
class Holding:
    """Capacity the scheduler already assigned (a running or scheduled job).

    ``gpu_memory_bytes`` is per GPU. Until NVML shows process ``pid`` using
    that much on a GPU, the difference is subtracted from the GPU's free memory.

    >>> Holding("train-3", "node-a", (GpuUuid("GPU-1"),), 2**34, cpus=4, memory_bytes=2**35)
    ... # doctest: +ELLIPSIS
    Holding(job_id='train-3', node_id='node-a', ...)
    """

    job_id: str
    node_id: str
    gpu_uuids: tuple[GpuUuid, ...]
    gpu_memory_bytes: int
    cpus: float
    memory_bytes: int
    pid: int | None = None
    shared: bool = False


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Node telemetry plus what the scheduler holds: the whole input about the cluster.

    >>> ClusterSnapshot(nodes=())
    ClusterSnapshot(nodes=(), holdings=())
    """

    nodes: tuple[NodeReading, ...]
    holdings: tuple[Holding, ...] = ()


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """How to choose among fitting nodes and how cautious to be.

    ``pack`` is best fit (fill nodes, keep whole nodes free for gangs);
    ``spread`` is worst fit (most free capacity). ``memory_headroom_bytes`` is
    kept free on every GPU; GPUs busier than ``max_util_pct`` because of other
    tenants are skipped.

    >>> PlacementPolicy(strategy="spread").memory_headroom_bytes == 512 * 2**20
    True
    """

    strategy: Literal["pack", "spread"] = "pack"
    memory_headroom_bytes: int = 512 * 2**20
    max_util_pct: float = 90.0


@dataclass(frozen=True, slots=True)
class NodePlacement:
    """The GPUs chosen on one node; indices are for ``CUDA_VISIBLE_DEVICES`` only.

    >>> NodePlacement("node-a", (0, 1), (GpuUuid("GPU-a0"), GpuUuid("GPU-a1"))).gpu_indices
    (0, 1)
    """

    node_id: str
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[GpuUuid, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one demand: where it goes, or per node why not.

    Placed: ``placement`` has one entry per node and ``reasons`` is empty.
    Unplaced: ``placement`` is empty and ``reasons`` has one line per node,
    each starting with the node id (reason tuples may be shared by decisions).

    >>> Decision("j1", (), ("node-a: needs 4 CPUs; 2 free",)).placed
    False
    """

    job_id: str
    placement: tuple[NodePlacement, ...]
    reasons: tuple[str, ...]

    @property
    def placed(self) -> bool:
        """True when the demand got all of its nodes."""
        return bool(self.placement)


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A pending job: ``gpus`` on each of ``nodes`` nodes.

    ``attained_gpu_s`` is the service it already had (runs before a
    preemption); ``est_duration_s`` its estimated *remaining* run time, if
    the caller has one, and ``est_error`` how far off such estimates were for
    its family (:attr:`scheduler.core.predictor.Prediction.error`; None:
    unknown), which the ``predictive`` mode compares with the policy's
    ``max_est_error``; ``queued_at`` when it last entered the queue (aging
    counts from there; default ``submitted_at``).

    >>> QueuedJob("train-7", "vision", 0, gpus=4, submitted_at=100.0).total_gpus
    4
    """

    job_id: str
    team: str
    priority: int
    gpus: int
    submitted_at: float
    nodes: int = 1
    attained_gpu_s: float = 0.0
    est_duration_s: float | None = None
    queued_at: float | None = None
    est_error: float | None = None

    @property
    def total_gpus(self) -> int:
        """GPUs over all its nodes."""
        return self.gpus * self.nodes


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job holding GPUs: ``gpus`` on each node of ``node_ids``, since ``started_at``.

    ``attained_gpu_s`` is its service *before* ``started_at`` (the policy adds
    the current run); ``est_end`` its estimated end, if known, and
    ``est_error`` as :class:`QueuedJob`'s. Pass a job that
    is being stopped with ``preemptible=False``: it still holds its GPUs.

    >>> RunningJob("train-3", "nlp", 0, gpus=8, node_ids=("n1",), started_at=0.0).est_end is None
    True
    """

    job_id: str
    team: str
    priority: int
    gpus: int
    node_ids: tuple[str, ...]
    started_at: float
    attained_gpu_s: float = 0.0
    est_end: float | None = None
    preemptible: bool = True
    est_error: float | None = None


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """The knobs of the rules in this module's docstring.

    >>> QueuePolicy(mode="las", las_thresholds_gpu_s=(3600.0,), quotas={"nlp": 16}).mode
    'las'
    """

    mode: Mode = "fifo"
    backfill: bool = True
    preemption: bool = True
    quotas: Mapping[str, int] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    aging_s_per_priority: float | None = 3600.0
    las_thresholds_gpu_s: tuple[float, ...] = (3600.0, 36000.0)
    min_run_s: float = 300.0
    max_est_error: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown queue mode {self.mode!r}; expected one of {MODES}")
        if self.aging_s_per_priority is not None and self.aging_s_per_priority <= 0:
            raise ValueError("aging_s_per_priority must be positive (or None: no aging)")
        thresholds = self.las_thresholds_gpu_s
        if list(thresholds) != sorted(thresholds) or len(thresholds) >= RANK_STEP:
            raise ValueError(f"las_thresholds_gpu_s must ascend, fewer than {RANK_STEP}")
        if any(w <= 0 for w in self.weights.values()):
            raise ValueError("team weights must be positive")
        if any(q < 0 for q in self.quotas.values()):
            raise ValueError("team quotas must not be negative")
        if not self.max_est_error >= 0:
            raise ValueError("max_est_error must be a non-negative number")


@dataclass(frozen=True, slots=True)
class Reservation:
    """The head job's reserved start: ``start_at`` (maybe ``inf``) on ``node_ids``.

    ``spare_gpus``: per reserved node, the GPUs free at ``start_at`` beyond the
    head's need, which jobs that may run past ``start_at`` are allowed to use.
    """

    job_id: str
    start_at: float
    node_ids: tuple[str, ...]
    spare_gpus: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class QueuePlan:
    """One pass's decision.

    ``order``: pending jobs that may start now, to be placed in this order
    (placement may still refuse one). ``preempt``: running jobs to stop;
    ``victims_of`` says for which job of ``order`` (their GPUs are that job's:
    the jobs before it in ``order`` must not take them). ``keep_off_reservation``:
    the jobs of ``order`` that may use only the reservation's spare GPUs on its
    nodes. ``reasons``: why each other pending job waits. ``next_change_at``:
    the earliest time the plan may change without an arrival or an end (a
    queue demotion, aging, a protection running out), or None. ``ranked``:
    every pending job in the order rules 1-4 rank them (what a queue listing shows).
    """

    order: tuple[str, ...]
    preempt: tuple[str, ...]
    reasons: Mapping[str, str]
    reservation: Reservation | None = None
    keep_off_reservation: frozenset[str] = frozenset()
    next_change_at: float | None = None
    victims_of: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ranked: tuple[str, ...] = ()
