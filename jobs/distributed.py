"""Data-parallel plumbing for a job launched as several processes, one per node.

The scheduler starts a ``resources.nodes = N`` job as N processes and tells
each one who it is through the environment: ``JOBWORKER_RANK`` (0..N-1),
``JOBWORKER_WORLD_SIZE`` (N), ``MASTER_ADDR`` and ``MASTER_PORT`` (rank 0's
rendezvous address). This module reads that, joins the ranks into one
``torch.distributed`` process group and offers the few collectives the
training loop needs. Plain torch: nothing here knows about Ray or MLflow.

Example::

    info = DistributedInfo.from_env()
    if info.enabled:
        init_process_group(info, device="cpu")
        try:
            ...
            if agree(ctx.should_stop()):   # every rank calls it, every step
                ...
        finally:
            shutdown()
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

RANK_VAR = "JOBWORKER_RANK"
"""Environment variable holding this process's rank, 0..world size - 1."""
WORLD_SIZE_VAR = "JOBWORKER_WORLD_SIZE"
"""Environment variable holding the number of processes (nodes) in the job."""
MASTER_ADDR_VAR = "MASTER_ADDR"
"""Environment variable holding rank 0's host, where the ranks meet."""
MASTER_PORT_VAR = "MASTER_PORT"
"""Environment variable holding rank 0's rendezvous TCP port."""

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective waits for a missing rank; torch's own default.

Generous on purpose: the leader may spend a while saving a checkpoint while
the other ranks already wait in the next step's collective.
"""

_FIELD_NAMES = {
    "rank": "rank",
    "world_size": "world_size",
    "master_addr": "master_addr",
    "master_port": "master_port",
}
_ENV_NAMES = {
    "rank": RANK_VAR,
    "world_size": WORLD_SIZE_VAR,
    "master_addr": MASTER_ADDR_VAR,
    "master_port": MASTER_PORT_VAR,
}


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in a data-parallel job; validated on construction.

    ``master_addr``/``master_port`` may be ``None`` only when the job is a
    single process (``world_size == 1``). Construction raises ``ValueError``
    naming the bad field.

    Example::

        info = DistributedInfo(rank=1, world_size=2, master_addr="10.0.0.5", master_port=29500)
        info.enabled, info.is_leader        # (True, False)
        DistributedInfo.from_env({})        # rank 0 of 1: single-process training
    """

    rank: int
    world_size: int
    master_addr: str | None
    master_port: int | None

    def __post_init__(self) -> None:
        """Reject a rank/world size/address combination that cannot form a group."""
        _check(
            _Values(self.rank, self.world_size, self.master_addr, self.master_port), _FIELD_NAMES
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DistributedInfo:
        """Read the job's place from ``environ`` (the process environment by default).

        Unset ``JOBWORKER_RANK``/``JOBWORKER_WORLD_SIZE`` mean rank 0 of 1.
        ``MASTER_ADDR``/``MASTER_PORT`` are required when the world size is
        above 1. A malformed value raises ``ValueError`` naming the variable.

        Example::

            DistributedInfo.from_env({"JOBWORKER_RANK": "1", "JOBWORKER_WORLD_SIZE": "2",
                                      "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"})
            DistributedInfo.from_env({"JOBWORKER_RANK": "2", "JOBWORKER_WORLD_SIZE": "2"})
            # ValueError: JOBWORKER_RANK=2 must be < JOBWORKER_WORLD_SIZE=2
        """
        rank = _env_int(environ, RANK_VAR)
        world_size = _env_int(environ, WORLD_SIZE_VAR)
        values = _Values(
            rank=0 if rank is None else rank,
            world_size=1 if world_size is None else world_size,
            master_addr=environ.get(MASTER_ADDR_VAR),
            master_port=_env_int(environ, MASTER_PORT_VAR),
        )
        _check(values, _ENV_NAMES)  # first, so errors name the variables, not the fields
        return cls(**values._asdict())

    @property
    def enabled(self) -> bool:
        """True when the job runs as more than one process."""
        return self.world_size > 1

    @property
    def is_leader(self) -> bool:
        """True on rank 0, the rank that logs metrics and saves checkpoints."""
        return self.rank == 0


def init_process_group(
    info: DistributedInfo, device: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join this process to the job's default process group (``dist.init_process_group``).

    The backend is ``"nccl"`` for a CUDA ``device`` (whose GPU becomes this
    process's current one) and ``"gloo"`` otherwise. Rendezvous is
    ``env://``: ``MASTER_ADDR``/``MASTER_PORT`` in the environment are set
    from ``info``. Blocks until all ``info.world_size`` ranks have joined or
    ``timeout_s`` passes; pair it with :func:`shutdown`.

    Example::

        init_process_group(DistributedInfo.from_env(), device="cuda")
    """
    if info.master_addr is None or info.master_port is None:
        raise ValueError(
            f"init_process_group needs master_addr and master_port; got {info.master_addr!r} "
            f"and {info.master_port!r} (set {MASTER_ADDR_VAR} and {MASTER_PORT_VAR})"
        )
    torch_device = torch.device(device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend == "nccl":
        # The scheduler pins each process to its own GPUs, so "cuda" means cuda:0.
        torch.cuda.set_device(torch_device.index or 0)
    os.environ[MASTER_ADDR_VAR] = info.master_addr
    os.environ[MASTER_PORT_VAR] = str(info.master_port)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (``all_reduce`` with ``MAX``).

    A collective: every rank must call it at the same point, which is what
    lets ranks stop together instead of one waiting forever in an all-reduce.
    Without a process group it returns ``flag``.

    Example::

        if agree(ctx.should_stop()):   # rank 1 got SIGTERM: all ranks stop here
            raise StopRequested
    """
    if not dist.is_initialized():
        return flag
    vote = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed element-wise over all ranks, in place (``all_reduce`` with ``SUM``).

    A collective, like :func:`agree`. ``values`` must be on the process
    group's device (the training device). Without a process group it
    returns ``values`` unchanged.

    Example::

        totals = all_sum(torch.stack((loss.detach() * n, hits, n_tensor)))
    """
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def shutdown() -> None:
    """Leave the process group if one was joined (``dist.destroy_process_group``); idempotent.

    Free every DistributedDataParallel wrapper before calling this. A wrapper's C++
    Reducer holds the group; when it holds the last reference, the group is destroyed
    as the wrapper is freed, with the GIL held, and gloo's destructor joins its worker
    threads, one of which may still need the GIL to free the tensor of a collective that
    just finished (``agree``'s vote): a deadlock, seen when the CPUs are busy. Destroyed
    here instead, through the Python group objects, it runs without the GIL.
    ``gc.collect()`` first frees a wrapper that only a reference cycle still keeps.

    Example::

        try:
            ...
        finally:
            shutdown()
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    """``environ[name]`` as an int, ``None`` when unset; ``ValueError`` naming ``name``."""
    raw = environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


class _Values(NamedTuple):
    """:class:`DistributedInfo`'s fields before validation."""

    rank: int
    world_size: int
    master_addr: str | None
    master_port: int | None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _check(info: _Values, names: Mapping[str, str]) -> None:
    """Validate ``info``; messages use ``names`` (field or environment variable names)."""
    rank, world = names["rank"], names["world_size"]
    addr, port = names["master_addr"], names["master_port"]
    if info.world_size < 1:
        raise ValueError(f"{world} must be >= 1, got {info.world_size}")
    if info.rank < 0:
        raise ValueError(f"{rank} must be >= 0, got {info.rank}")
    if info.rank >= info.world_size:
        raise ValueError(f"{rank}={info.rank} must be < {world}={info.world_size}")
    if info.master_port is not None and not 1 <= info.master_port <= 65535:
        raise ValueError(f"{port} must be a TCP port in 1..65535, got {info.master_port}")
    if info.master_addr is not None and not info.master_addr.strip():
        raise ValueError(f"{addr} must not be empty")
    if info.enabled and (info.master_addr is None or info.master_port is None):
        missing = [n for n, v in ((addr, info.master_addr), (port, info.master_port)) if v is None]
        raise ValueError(
            f"{world}={info.world_size} needs rank 0's address: set {' and '.join(missing)}"
        )
