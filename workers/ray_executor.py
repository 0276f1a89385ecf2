"""The :class:`~workers.executor.Executor` on Ray: one training worker actor per attempt.

Each actor is pinned to the node the scheduler chose with a hard node-affinity
strategy; it reserves no Ray CPUs or GPUs, because the scheduler, not Ray's
logical counts, owns the assignment. A multi-node job has one actor per node
(``jobworker-train-<job>`` for rank 0, ``…-<job>.r<k>`` for rank k), polled,
stopped and released together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.executor import LaunchRequest, WorkerPhase, WorkerReport, combine_ranks
from workers.ray_training_worker import TrainingWorker

log = logging.getLogger(__name__)

_ACTOR_PREFIX = "jobworker-train-"
_RANK_SEP = ".r"


def worker_key(job_id: str, rank: int) -> str:
    """The name suffix of a job's worker actor of ``rank`` (rank 0: the job id itself)."""
    return job_id if rank == 0 else f"{job_id}{_RANK_SEP}{rank}"


class RayExecutor:
    """Starts, polls and stops training worker actors.

    Example::

        executor = RayExecutor(namespace="jobworker", work_root=Path(".jobworker/work"))
        executor.launch(request)
        executor.poll([request.job_id])
    """

    def __init__(self, namespace: str, work_root: Path, poll_timeout_s: float = 10.0) -> None:
        self._namespace = namespace
        self._work_root = work_root.resolve()
        self._poll_timeout_s = poll_timeout_s
        self._actors: dict[str, Any] = {}
        self._log_offsets: dict[str, int] = {}  # absent after a restart: the actor knows
        self._starts: dict[str, Any] = {}
        self._world: dict[str, int] = {}  # ranks per job launched by this process

    def launch(self, request: LaunchRequest) -> None:
        key = worker_key(request.job_id, request.rank)
        work_dir = self._work_root / request.job_id / f"attempt-{request.attempt}"
        if request.world_size > 1:
            work_dir = work_dir / f"rank-{request.rank}"
        self._world[request.job_id] = request.world_size
        launch = dataclasses.asdict(request)
        if request.master_node_id is not None:
            launch["master_addr"] = self._node_address(request.master_node_id)
        actor = TrainingWorker.options(  # type: ignore[attr-defined]
            name=f"{_ACTOR_PREFIX}{key}",
            namespace=self._namespace,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(request.node_id, soft=False),
        ).remote(launch, str(work_dir))
        self._actors[key] = actor
        self._log_offsets[key] = 0
        self._starts[key] = actor.start.remote()

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        keys = {job_id: self._keys(job_id, (world_sizes or {}).get(job_id)) for job_id in job_ids}
        refs: dict[str, Any] = {}
        by_key: dict[str, WorkerReport] = {}
        for key in (k for ks in keys.values() for k in ks):
            actor = self._actor(key)
            if actor is None:
                by_key[key] = WorkerReport(key, WorkerPhase.LOST, error="no worker found")
            else:
                refs[key] = actor.poll.remote(self._log_offsets.get(key))
        for key, ref in refs.items():
            by_key[key] = self._report(key, ref)
        reports: dict[str, WorkerReport] = {}
        for job_id, ks in keys.items():
            ranks = [by_key[k] for k in ks]
            reports[job_id] = (
                combine_ranks(job_id, ranks)
                if len(ranks) > 1
                else dataclasses.replace(ranks[0], job_id=job_id)
            )
        return reports

    def _keys(self, job_id: str, world_size: int | None = None) -> list[str]:
        world = world_size or self._world.get(job_id) or 1
        return [worker_key(job_id, rank) for rank in range(world)]

    def _node_address(self, node_id: str) -> str:
        """The IP of a Ray node (``ray.nodes()``): a gang's rendezvous address."""
        for node in ray.nodes():  # type: ignore[no-untyped-call]
            if node["NodeID"] == node_id:
                return str(node["NodeManagerAddress"])
        raise RuntimeError(f"node {node_id} is not in the Ray cluster")

    def _report(self, job_id: str, ref: Any) -> WorkerReport:
        try:
            start = self._starts.get(job_id)
            if start is not None:
                # Never block the loop on an actor that is still starting.
                ready, _ = ray.wait([start], timeout=0)
                if not ready:
                    return WorkerReport(job_id, WorkerPhase.STARTING)
                ray.get(start)
                del self._starts[job_id]
            raw = ray.get(ref, timeout=self._poll_timeout_s)
        except GetTimeoutError:
            return WorkerReport(job_id, WorkerPhase.STARTING)
        except RayActorError as exc:
            self._forget(job_id)
            return WorkerReport(job_id, WorkerPhase.LOST, error=f"worker lost: {exc}")
        except Exception as exc:  # the start call raised: the job process could not start
            self._forget(job_id)
            return WorkerReport(job_id, WorkerPhase.FAILED, error=f"could not start: {exc}")
        self._log_offsets[job_id] = raw["log_offset"] + raw["log_bytes"]
        progress = raw["progress"] or {}
        result = raw["result"]
        common: dict[str, Any] = {
            "logs": raw["logs"],
            "progress": progress if progress.get("step") is not None else None,
            "pid": raw["pid"],
            "run_id": progress.get("run_id"),
        }
        if raw["pid"] is None:
            return WorkerReport(job_id, WorkerPhase.STARTING, **common)
        if raw["exit_code"] is None:
            return WorkerReport(job_id, WorkerPhase.RUNNING, **common)
        if result is None:
            code = raw["exit_code"]
            return WorkerReport(
                job_id, WorkerPhase.FAILED, error=f"job process exited with code {code}", **common
            )
        phase = {
            "succeeded": WorkerPhase.SUCCEEDED,
            "stopped": WorkerPhase.STOPPED,
        }.get(result["status"], WorkerPhase.FAILED)
        common["run_id"] = result.get("run_id") or common["run_id"]
        return WorkerReport(
            job_id,
            phase,
            model_version=result.get("model_version"),
            error=result.get("error"),
            **common,
        )

    def stop(self, job_id: str, grace_s: float) -> None:
        for key in self._keys(job_id, self._discover(job_id)):
            actor = self._actor(key)
            if actor is not None:
                try:
                    ray.get(actor.stop.remote(grace_s), timeout=self._poll_timeout_s)
                except (RayActorError, GetTimeoutError) as exc:
                    log.warning("stop of %s failed: %s", key, exc)

    def release(self, job_id: str) -> None:
        for key in self._keys(job_id, self._discover(job_id)):
            actor = self._actor(key)
            if actor is not None:
                # An actor that is already gone has nothing left to free.
                with contextlib.suppress(RayActorError, GetTimeoutError):
                    ray.get(actor.kill.remote(), timeout=self._poll_timeout_s)
                ray.kill(actor)
            self._forget(key)
        self._world.pop(job_id, None)

    def active(self) -> set[str]:
        return {key.split(_RANK_SEP)[0] for key in self._named()}

    def _named(self) -> list[str]:
        names = ray.util.list_named_actors(all_namespaces=True)
        return [
            n["name"].removeprefix(_ACTOR_PREFIX)
            for n in names
            if n["namespace"] == self._namespace and n["name"].startswith(_ACTOR_PREFIX)
        ]

    def _discover(self, job_id: str) -> int | None:
        """How many ranks a job has, when this process did not launch it (after a restart)."""
        if job_id in self._world:
            return self._world[job_id]
        return sum(1 for key in self._named() if key.split(_RANK_SEP)[0] == job_id) or None

    def _actor(self, job_id: str) -> Any | None:
        actor = self._actors.get(job_id)
        if actor is None:
            try:
                actor = ray.get_actor(f"{_ACTOR_PREFIX}{job_id}", namespace=self._namespace)
            except ValueError:
                return None
            self._actors[job_id] = actor
        return actor

    def _forget(self, job_id: str) -> None:
        self._actors.pop(job_id, None)
        self._starts.pop(job_id, None)
        self._log_offsets.pop(job_id, None)
