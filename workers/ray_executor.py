"""The :class:`~workers.executor.Executor` on Ray: one training worker actor per attempt.

Each actor is pinned to the node the scheduler chose with a hard node-affinity
strategy; it reserves no Ray CPUs or GPUs, because the scheduler, not Ray's
logical counts, owns the assignment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.executor import LaunchRequest, WorkerPhase, WorkerReport
from workers.ray_training_worker import TrainingWorker

log = logging.getLogger(__name__)

_ACTOR_PREFIX = "jobworker-train-"


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

    def launch(self, request: LaunchRequest) -> None:
        work_dir = self._work_root / request.job_id / f"attempt-{request.attempt}"
        actor = TrainingWorker.options(  # type: ignore[attr-defined]
            name=f"{_ACTOR_PREFIX}{request.job_id}",
            namespace=self._namespace,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(request.node_id, soft=False),
        ).remote(dataclasses.asdict(request), str(work_dir))
        self._actors[request.job_id] = actor
        self._log_offsets[request.job_id] = 0
        self._starts[request.job_id] = actor.start.remote()

    def poll(self, job_ids: Sequence[str]) -> dict[str, WorkerReport]:
        refs: dict[str, Any] = {}
        reports: dict[str, WorkerReport] = {}
        for job_id in job_ids:
            actor = self._actor(job_id)
            if actor is None:
                reports[job_id] = WorkerReport(job_id, WorkerPhase.LOST, error="no worker found")
            else:
                refs[job_id] = actor.poll.remote(self._log_offsets.get(job_id))
        for job_id, ref in refs.items():
            reports[job_id] = self._report(job_id, ref)
        return reports

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
        actor = self._actor(job_id)
        if actor is not None:
            try:
                ray.get(actor.stop.remote(grace_s), timeout=self._poll_timeout_s)
            except (RayActorError, GetTimeoutError) as exc:
                log.warning("stop of %s failed: %s", job_id, exc)

    def release(self, job_id: str) -> None:
        actor = self._actor(job_id)
        if actor is not None:
            # An actor that is already gone has nothing left to free.
            with contextlib.suppress(RayActorError, GetTimeoutError):
                ray.get(actor.kill.remote(), timeout=self._poll_timeout_s)
            ray.kill(actor)
        self._forget(job_id)

    def active(self) -> set[str]:
        names = ray.util.list_named_actors(all_namespaces=True)
        return {
            n["name"].removeprefix(_ACTOR_PREFIX)
            for n in names
            if n["namespace"] == self._namespace and n["name"].startswith(_ACTOR_PREFIX)
        }

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
