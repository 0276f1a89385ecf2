"""The :class:`~workers.interface.replicas.ReplicaLauncher` on Ray: one actor per replica.

Both halves live here: :class:`RayReplicaLauncher` in the control plane, and the
:class:`InferenceReplica` actor it starts on the node the scheduler chose (hard
node affinity). The replica sees only the GPU it was given:
``CUDA_VISIBLE_DEVICES`` is set before torch is imported. Torch and MLflow are
imported in :meth:`InferenceReplica.start`, inside the actor process, never in
the control plane. Once warm it serves over ``workers.interface.channel``, with a
secret it makes itself and returns, with its address, from ``start`` (the Ray
call the control plane makes anyway), so the secret travels only through Ray.
It listens on 127.0.0.1 when it runs on the control plane's machine (the
embedded set-up: Ray reports the machine's address even for a head started on
127.0.0.1), else on its node's address.

Actors are owned by the control-plane process (not detached): when it dies,
its replicas go with it, and a restarted control plane starts them afresh
from the deployments in its store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
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

from workers.cpu_control import pin_serving
from workers.interface.channel import (
    MAX_ROWS_FACTOR,
    ChannelServer,
    InputLimits,
    new_secret,
)
from workers.interface.replicas import ReplicaPhase, ReplicaRequest, ReplicaStatus
from workers.memory_caps import register_replica, release_replica, replica_verdict
from workers.pinning import pinned_env
from workers.sim_backend import remove_usage, write_usage

log = logging.getLogger(__name__)

ACTOR_PREFIX = "jobworker-replica-"


def listen_host(node_ip: str, control_plane_ip: str) -> str:
    """Where a replica's channel listens: loopback when the router is on the same machine."""
    if node_ip == control_plane_ip or ipaddress.ip_address(node_ip).is_loopback:
        return "127.0.0.1"
    return node_ip


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)  # type: ignore[call-overload]
class InferenceReplica:
    """One replica; ``start`` returns its address, secret and input schema once it is warm."""

    def __init__(self, request: ReplicaRequest, control_plane_ip: str) -> None:
        self._request = request
        self._control_plane_ip = control_plane_ip
        os.environ.update(pinned_env(request.gpu_indices, request.cpus))
        pin_serving(request.serving_cores)  # off the cores training is pinned to
        self._server: ChannelServer | None = None

    def start(self) -> dict[str, Any]:
        import torch

        from workers.gpu_caps import limit_gpu_memory
        from workers.mlflow_models import load

        req = self._request
        torch.set_num_threads(max(1, int(req.cpus)))
        limit_gpu_memory(req.gpu_memory_bytes if req.gpu_indices else None)
        device = "cuda" if req.gpu_indices and torch.cuda.is_available() else "cpu"
        module, schema = load(req.model_uri, req.tracking_uri, device, req.allow_pickled_model)
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
        register_replica(
            req.node_dir, req.replica_id, os.getpid(), req.gpu_indices, req.gpu_memory_bytes
        )
        node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        secret = new_secret()
        self._server = ChannelServer(
            predict,
            secret=secret,
            limits=InputLimits(schema, req.max_batch_size * MAX_ROWS_FACTOR),
            host=listen_host(node_ip, self._control_plane_ip),
        )
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
            "secret": secret,
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
        self._ip: str | None = None  # this process's node address, read once connected

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
        ).remote(request, self._node_ip())
        self._replicas[request.replica_id] = _Replica(actor, request, actor.start.remote())

    def _node_ip(self) -> str:
        if self._ip is None:
            self._ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        return self._ip

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
                    why = replica_verdict(rep.request.node_dir, replica_id)
                    rep.status = ReplicaStatus(
                        replica_id, ReplicaPhase.DEAD, error=why or f"replica actor died: {exc}"
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
            secret=info["secret"],
            pid=info["pid"],
            input_shape=tuple(shape) if shape is not None else None,
            input_dtype=info["input_dtype"],
        )

    def stop(self, replica_id: str) -> None:
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        ray.kill(rep.actor, no_restart=True)  # the router has drained it already
        release_replica(rep.request.node_dir, replica_id)
        if rep.request.simulated_usage_dir:
            remove_usage(Path(rep.request.simulated_usage_dir), replica_id)
