"""The :class:`~workers.interface.replicas.ReplicaLauncher` on Ray: one actor per replica.

Both halves live here: :class:`RayReplicaLauncher` in the control plane, and the
:class:`InferenceReplica` actor it starts on the node the scheduler chose (hard
node affinity). The replica sees only the GPU it was given:
``CUDA_VISIBLE_DEVICES`` is set before torch is imported. Torch and MLflow are
imported in :meth:`InferenceReplica.start`, inside the actor process, never in
the control plane. Once warm it serves over ``workers.interface.channel``.

Actors are owned by the control-plane process (not detached): when it dies,
its replicas go with it, and a restarted control plane starts them afresh
from the deployments in its store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.interface.channel import ChannelServer
from workers.interface.replicas import ReplicaPhase, ReplicaRequest, ReplicaStatus
from workers.pinning import pinned_env
from workers.sim_backend import remove_usage, write_usage

log = logging.getLogger(__name__)

ACTOR_PREFIX = "jobworker-replica-"


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)  # type: ignore[call-overload]
class InferenceReplica:
    """One replica; ``start`` returns its address and input schema once it is warm."""

    def __init__(self, request: ReplicaRequest) -> None:
        self._request = request
        os.environ.update(pinned_env(request.gpu_indices, request.cpus))
        self._server: ChannelServer | None = None

    def start(self) -> dict[str, Any]:
        import torch

        from workers.mlflow_models import load

        req = self._request
        torch.set_num_threads(max(1, int(req.cpus)))
        device = "cuda" if req.gpu_indices and torch.cuda.is_available() else "cpu"
        module, schema = load(req.model_uri, req.tracking_uri, device)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            module.eval()  # an exported (pt2) program is traced in eval mode and refuses this

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = module(torch.from_numpy(batch).to(device))
            return np.asarray(out.detach().cpu().numpy())

        started = time.perf_counter()
        if schema is not None:  # warm up: first calls allocate and pick kernels
            for rows in (1, req.max_batch_size):
                shape = [rows if d == -1 else d for d in schema.shape]
                predict(np.zeros(shape, dtype=schema.dtype))
        warmup_ms = (time.perf_counter() - started) * 1000
        host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._server = ChannelServer(predict, host=host)
        self._server.start()
        if req.simulated_usage_dir and req.gpu_indices:
            write_usage(
                Path(req.simulated_usage_dir),
                req.replica_id,
                os.getpid(),
                list(req.gpu_indices),
                req.gpu_memory_bytes,
            )
        host, port = self._server.address
        return {
            "host": host,
            "port": port,
            "pid": os.getpid(),
            "device": device,
            "warmup_ms": warmup_ms,
            "input_shape": list(schema.shape) if schema else None,
            "input_dtype": schema.dtype if schema else None,
        }

    def ping(self) -> int:
        return os.getpid()


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
        ).remote(request)
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
