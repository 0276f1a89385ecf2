"""The :class:`~workers.replicas.ReplicaLauncher` on Ray: one actor per replica.

Actors are owned by the control-plane process (not detached): when it dies,
its replicas go with it, and a restarted control plane starts them afresh
from the deployments in its store.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.ray_replica import InferenceReplica
from workers.replicas import ReplicaPhase, ReplicaRequest, ReplicaStatus
from workers.sim_backend import remove_usage

log = logging.getLogger(__name__)

ACTOR_PREFIX = "jobworker-replica-"


@dataclasses.dataclass
class _Replica:
    actor: Any
    request: ReplicaRequest
    start: Any  # ObjectRef of start()
    ping: Any = None  # ObjectRef of the outstanding liveness ping
    status: ReplicaStatus | None = None


class RayReplicaLauncher:
    """Starts, watches and stops inference replica actors.

    Example::

        launcher = RayReplicaLauncher(namespace="jobworker")
        launcher.start(request)
        launcher.poll([request.replica_id])
    """

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._replicas: dict[str, _Replica] = {}

    def start(self, request: ReplicaRequest) -> None:
        runtime_env = (
            {"env_vars": {"PYTHONPATH": ":".join(request.python_path)}}
            if request.python_path
            else None
        )
        actor = InferenceReplica.options(  # type: ignore[attr-defined]
            name=f"{ACTOR_PREFIX}{request.replica_id}",
            namespace=self._namespace,
            scheduling_strategy=NodeAffinitySchedulingStrategy(request.node_id, soft=False),
            runtime_env=runtime_env,
        ).remote(dataclasses.asdict(request))
        self._replicas[request.replica_id] = _Replica(actor, request, actor.start.remote())

    def poll(self, replica_ids: Sequence[str]) -> dict[str, ReplicaStatus]:
        return {rid: self._poll_one(rid) for rid in replica_ids}

    def _poll_one(self, replica_id: str) -> ReplicaStatus:
        rep = self._replicas.get(replica_id)
        if rep is None:
            return ReplicaStatus(replica_id, ReplicaPhase.DEAD, error="no such replica")
        if rep.status is None:
            ready, _ = ray.wait([rep.start], timeout=0)
            if not ready:
                return ReplicaStatus(replica_id, ReplicaPhase.STARTING)
            rep.status = self._started(replica_id, rep.start)
            return rep.status
        if rep.status.phase is not ReplicaPhase.READY:
            return rep.status
        if rep.ping is not None:
            ready, _ = ray.wait([rep.ping], timeout=0)
            if ready:
                try:
                    ray.get(rep.ping)
                except (RayActorError, RayTaskError) as exc:
                    rep.status = ReplicaStatus(
                        replica_id, ReplicaPhase.DEAD, error=f"replica actor died: {exc}"
                    )
                    return rep.status
                rep.ping = None
        if rep.ping is None:
            rep.ping = rep.actor.ping.remote()
        return rep.status

    def _started(self, replica_id: str, ref: Any) -> ReplicaStatus:
        try:
            info = ray.get(ref)
        except RayActorError as exc:
            return ReplicaStatus(replica_id, ReplicaPhase.DEAD, error=f"replica actor died: {exc}")
        except RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            return ReplicaStatus(replica_id, ReplicaPhase.FAILED, error=str(cause))
        shape = info["input_shape"]
        return ReplicaStatus(
            replica_id,
            ReplicaPhase.READY,
            host=info["host"],
            port=info["port"],
            pid=info["pid"],
            input_shape=tuple(shape) if shape is not None else None,
            input_dtype=info["input_dtype"],
        )

    def stop(self, replica_id: str) -> None:
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        ray.kill(rep.actor, no_restart=True)  # the router has drained it already
        if rep.request.simulated_usage_dir:
            remove_usage(Path(rep.request.simulated_usage_dir), replica_id)
