"""Enforced GPU memory caps: the node's cap registry, the watchdog's policy, and verdicts.

A job or replica that asked for ``gpu_memory_gb`` is capped twice: in its own
process, torch's allocator is limited to that share (:mod:`workers.gpu_caps`);
and on its node, the agent's :class:`CapWatchdog` compares every registered
process's per-process GPU memory (NVML's on real GPUs, the declared usage on
simulated ones: the same ``GpuReading.processes``) with its cap, and stops a
process that stays over it for ``grace_s``, writing the reason first
(``used 23.1 GiB on GPU 1, asked for 8 GiB; raise resources.gpu_memory_gb``).

Registry: ``subdir(node_dir, MEMORY_CAPS)/<owner>@<pid>.cap.json``, one per
capped process, written by whoever started it (the training worker, the
replica)::

    {"format": 1, "kind": "job", "owner_id": "j-42", "pid": 1234,
     "pid_start_ticks": 123456, "gpu_indices": [1],
     "cap_bytes_per_gpu": 8589934592, "verdict_path": ".../cap_verdict.json"}

``pid_start_ticks`` guards against a recycled pid, as in the simulated usage
files: the record of a dead process is dropped, never enforced on its
successor. A job's process leads its own process group (the training worker
starts it in a new session): the whole group is killed. A replica's process is
killed alone.

Stdlib only: cheap to import in an actor, and ``bench/gpu_check.py`` runs it on a GPU
machine that has nothing but torch and nvidia-ml-py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from workers.files import write_json_atomic
from workers.interface.telemetry import GIB, GpuReading
from workers.node_dir import MEMORY_CAPS, subdir
from workers.procs import check_job_id, pid_alive, proc_stat

if TYPE_CHECKING:
    from workers.interface.executor import LaunchRequest

log = logging.getLogger(__name__)

CONTEXT_ALLOWANCE_BYTES = GIB
"""What a process may hold over its cap before the watchdog acts: the CUDA context and
kernels, which NVML counts and torch's memory fraction does not."""

DEFAULT_GRACE_S = 4.0
"""How long a process may stay over its cap before it is stopped (two samples at 2 s)."""

JOB_VERDICT = "cap_verdict.json"
"""The verdict's name in a job's work dir, where its training worker looks for it."""

_CAP_SUFFIX = ".cap.json"
_VERDICT_SUFFIX = ".verdict.json"

Kind = Literal["job", "replica"]


@dataclass(frozen=True)
class CapRecord:
    """One capped process (a registry file)."""

    kind: Kind
    owner_id: str
    pid: int
    gpu_indices: tuple[int, ...]
    cap_bytes_per_gpu: int
    verdict_path: str
    pid_start_ticks: int | None = None

    @property
    def key(self) -> str:
        """Names this process of this owner (the registry file's stem)."""
        return f"{self.owner_id}@{self.pid}"

    def to_json(self) -> dict[str, object]:
        return {"format": 1, **asdict(self), "gpu_indices": list(self.gpu_indices)}

    @classmethod
    def from_json(cls, data: object) -> CapRecord:
        """The record of a registry file's JSON; ``ValueError`` saying what is wrong."""
        if not isinstance(data, dict) or data.get("format") != 1:
            raise ValueError("not a format 1 GPU memory cap record")
        try:
            record = cls(
                kind=data["kind"],
                owner_id=str(data["owner_id"]),
                pid=int(data["pid"]),
                gpu_indices=tuple(int(i) for i in data["gpu_indices"]),
                cap_bytes_per_gpu=int(data["cap_bytes_per_gpu"]),
                verdict_path=str(data["verdict_path"]),
                pid_start_ticks=data.get("pid_start_ticks"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad GPU memory cap record: {exc!r}") from None
        if record.kind not in ("job", "replica") or record.pid <= 0:
            raise ValueError(f"bad GPU memory cap record: kind {record.kind!r}, pid {record.pid}")
        if record.cap_bytes_per_gpu <= 0 or min(record.gpu_indices, default=0) < 0:
            raise ValueError("bad GPU memory cap record: cap and GPU indices must be positive")
        return record


@dataclass(frozen=True)
class Overuse:
    """A capped process found over its cap on one of its GPUs."""

    cap: CapRecord
    gpu_index: int
    used_bytes: int

    @property
    def reason(self) -> str:
        """What the job or deployment shows: GiB to one decimal, the GPU, and the fix."""
        asked = f"{round(self.cap.cap_bytes_per_gpu / GIB, 2):g}"
        return (
            f"used {self.used_bytes / GIB:.1f} GiB on GPU {self.gpu_index}, "
            f"asked for {asked} GiB; raise resources.gpu_memory_gb"
        )


# -- the policy (pure) --------------------------------------------------------------------


def judge(
    caps: Sequence[CapRecord],
    gpus: Sequence[GpuReading],
    now_s: float,
    over_since_s: Mapping[str, float],
    grace_s: float = DEFAULT_GRACE_S,
    allowance_bytes: int = CONTEXT_ALLOWANCE_BYTES,
) -> tuple[list[Overuse], dict[str, float]]:
    """Which capped processes to stop now, and the state for the next sample.

    A process is over when, on one of its GPUs, its reading exceeds its cap plus
    ``allowance_bytes``; it is stopped once it has been over at every sample for at
    least ``grace_s`` (since the first sample that saw it over). A sample that sees
    it back under its cap forgets that. ``over_since_s`` (by :attr:`CapRecord.key`)
    is what the previous call returned; the clock is the caller's.

    >>> cap = CapRecord(kind="job", owner_id="j", pid=7, gpu_indices=(0,),
    ...                 cap_bytes_per_gpu=GIB, verdict_path="v")
    >>> judge([cap], [], 0.0, {})
    ([], {})
    """
    used = {
        (gpu.index, proc.pid): proc.used_memory_bytes
        for gpu in gpus
        for proc in gpu.processes
        if proc.used_memory_bytes is not None
    }
    stop: list[Overuse] = []
    state: dict[str, float] = {}
    for cap in caps:
        readings = [(used.get((index, cap.pid), 0), index) for index in cap.gpu_indices]
        used_bytes, index = max(readings, default=(0, 0))
        if used_bytes <= cap.cap_bytes_per_gpu + allowance_bytes:
            continue
        since = over_since_s.get(cap.key, now_s)
        if now_s - since >= grace_s:
            stop.append(Overuse(cap, index, used_bytes))
        else:
            state[cap.key] = since
    return stop, state


# -- the registry --------------------------------------------------------------------------


def caps_dir(node_dir: str | Path) -> Path:
    """The node's cap registry (created if absent)."""
    return subdir(node_dir, MEMORY_CAPS)


def register_cap(
    registry: Path,
    kind: Kind,
    owner_id: str,
    pid: int,
    gpu_indices: Sequence[int],
    cap_bytes_per_gpu: int,
    verdict_path: Path,
) -> Path:
    """Cap process ``pid`` of ``owner_id`` at ``cap_bytes_per_gpu`` on each of its GPUs
    (the node's indices); the watchdog writes why it stopped it to ``verdict_path``."""
    check_job_id(owner_id)
    stat = proc_stat(pid)
    record = CapRecord(
        kind=kind,
        owner_id=owner_id,
        pid=pid,
        pid_start_ticks=None if stat is None else stat[1],
        gpu_indices=tuple(gpu_indices),
        cap_bytes_per_gpu=cap_bytes_per_gpu,
        verdict_path=str(verdict_path),
    )
    target = registry / f"{record.key}{_CAP_SUFFIX}"
    write_json_atomic(target, record.to_json())
    return target


def remove_caps(registry: Path, owner_id: str) -> int:
    """Forget every cap of ``owner_id``; how many there were."""
    removed = 0
    for path in registry.glob(f"*{_CAP_SUFFIX}"):
        if path.name.rsplit("@", 1)[0] == owner_id:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def live_caps(registry: Path) -> list[CapRecord]:
    """The caps of live processes; a dead (or recycled) process's record is removed."""
    records = []
    for path in sorted(registry.glob(f"*{_CAP_SUFFIX}")):
        try:
            record = CapRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            continue  # removed between listing and reading
        except (OSError, ValueError) as exc:
            log.warning("removing unreadable GPU memory cap %s: %s", path, exc)
            path.unlink(missing_ok=True)
            continue
        if pid_alive(record.pid, record.pid_start_ticks):
            records.append(record)
        else:
            path.unlink(missing_ok=True)
    return records


def read_verdict(path: Path) -> str | None:
    """The reason the watchdog stopped a process, if it did."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    reason = data.get("reason") if isinstance(data, dict) else None
    return str(reason) if reason else None


# -- the call sites' one-liners ---------------------------------------------------------------


def register_job(launch: LaunchRequest, pid: int, work_dir: Path) -> None:
    """Cap a job process at what the scheduler gave it; a whole-GPU job has no cap."""
    cap_bytes = launch.node.held_gpu_memory_bytes(launch.spec)
    if launch.node_dir and launch.node.gpu_indices and cap_bytes > 0:
        register_cap(
            caps_dir(launch.node_dir),
            "job",
            launch.job_id,
            pid,
            launch.node.gpu_indices,
            cap_bytes,
            work_dir / JOB_VERDICT,
        )


def release_job(launch: LaunchRequest) -> None:
    """Forget a job's caps (its process ended or was killed)."""
    if launch.node_dir:
        remove_caps(caps_dir(launch.node_dir), launch.job_id)


def job_verdict(work_dir: Path) -> str | None:
    """Why the watchdog stopped this job attempt's process, if it did."""
    return read_verdict(work_dir / JOB_VERDICT)


def register_replica(
    node_dir: str | None, replica_id: str, pid: int, gpu_indices: Sequence[int], cap_bytes: int
) -> None:
    """Cap the replica process ``pid`` (the one holding the model's GPU memory)."""
    if node_dir and gpu_indices and cap_bytes > 0:
        registry = caps_dir(node_dir)
        verdict = registry / f"{replica_id}{_VERDICT_SUFFIX}"
        register_cap(registry, "replica", replica_id, pid, gpu_indices, cap_bytes, verdict)


def replica_verdict(node_dir: str | None, replica_id: str) -> str | None:
    """Why the watchdog stopped a replica, if it did (readable where the node's dir is)."""
    if not node_dir:
        return None
    return read_verdict(Path(node_dir) / MEMORY_CAPS / f"{replica_id}{_VERDICT_SUFFIX}")


def release_replica(node_dir: str | None, replica_id: str) -> None:
    """Forget a stopped replica's cap and verdict."""
    if node_dir:
        registry = caps_dir(node_dir)
        remove_caps(registry, replica_id)
        (registry / f"{replica_id}{_VERDICT_SUFFIX}").unlink(missing_ok=True)


# -- the watchdog (the node agent's) -------------------------------------------------------------


class CapWatchdog:
    """Enforces the registry's caps on each telemetry sample (the node agent calls
    :meth:`check`). Verdict first, then the kill: whoever sees the process gone finds why.

    Example::

        watchdog = CapWatchdog(caps_dir(node_dir), grace_s=4.0)
        watchdog.check(backend.read(), time.monotonic())
    """

    def __init__(
        self,
        registry: Path,
        grace_s: float = DEFAULT_GRACE_S,
        allowance_bytes: int = CONTEXT_ALLOWANCE_BYTES,
    ) -> None:
        self._registry = registry
        self._grace_s = grace_s
        self._allowance_bytes = allowance_bytes
        self._over_since_s: dict[str, float] = {}

    def check(self, gpus: Sequence[GpuReading], now_s: float) -> list[Overuse]:
        """Stop every registered process over its cap for the grace; what was stopped."""
        stop, self._over_since_s = judge(
            live_caps(self._registry),
            gpus,
            now_s,
            self._over_since_s,
            self._grace_s,
            self._allowance_bytes,
        )
        for over in stop:
            self._stop(over)
        return stop

    def _stop(self, over: Overuse) -> None:
        cap = over.cap
        log.warning("stopping %s %s (pid %d): %s", cap.kind, cap.owner_id, cap.pid, over.reason)
        verdict = {
            "reason": over.reason,
            "owner_id": cap.owner_id,
            "pid": cap.pid,
            "gpu_index": over.gpu_index,
            "used_bytes": over.used_bytes,
            "cap_bytes_per_gpu": cap.cap_bytes_per_gpu,
        }
        write_json_atomic(Path(cap.verdict_path), verdict)
        # Checked again just before the kill: never signal a process that reused the pid.
        if pid_alive(cap.pid, cap.pid_start_ticks):
            kill = os.killpg if cap.kind == "job" else os.kill
            with contextlib.suppress(ProcessLookupError):
                kill(cap.pid, signal.SIGKILL)
        (self._registry / f"{cap.key}{_CAP_SUFFIX}").unlink(missing_ok=True)
