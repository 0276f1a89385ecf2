"""The :class:`~workers.interface.replicas.ReplicaLauncher` on Ray: one actor per replica.

Both halves live here: :class:`RayReplicaLauncher` in the control plane, and the
:class:`InferenceReplica` actor it starts on the node the scheduler chose (hard
node affinity). The replica sees only the GPU it was given:
``CUDA_VISIBLE_DEVICES`` is set in the actor's environment, which its serving
process inherits. The actor is the control handle; the model and the channel
server run in a plain child process (``workers/replica_process.py``), so serving
shares no GIL with Ray's threads, and torch and MLflow are imported there, never
in the control plane. The actor makes the channel secret and returns it, with the
child's address, from ``start`` (the Ray call the control plane makes anyway), so
the secret travels only through Ray and the child's stdin. It listens on
127.0.0.1 when it runs on the control plane's machine (the embedded set-up: Ray
reports the machine's address even for a head started on 127.0.0.1), and then on
a Unix socket too, which the router uses; else on its node's address.

Actors are owned by the control-plane process (not detached): when it dies,
its replicas go with it, and a restarted control plane starts them afresh
from the deployments in its store.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.cpu_control import pin_serving
from workers.interface.channel import new_secret
from workers.interface.replicas import ReplicaPhase, ReplicaRequest, ReplicaStatus
from workers.memory_caps import register_replica, release_replica, replica_verdict
from workers.pinning import pinned_env
from workers.replica_process import launch_config
from workers.sim_backend import remove_usage, write_usage

log = logging.getLogger(__name__)

ACTOR_PREFIX = "jobworker-replica-"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # where ``workers`` is importable from


def listen_host(node_ip: str, control_plane_ip: str) -> str:
    """Where a replica's channel listens: loopback when the router is on the same machine."""
    if node_ip == control_plane_ip or ipaddress.ip_address(node_ip).is_loopback:
        return "127.0.0.1"
    return node_ip


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)  # type: ignore[call-overload]
class InferenceReplica:
    """One replica's control handle; ``start`` returns its address, secret and input schema
    once it is warm.

    The model and the channel server live in a plain child process
    (``workers/replica_process.py``) that this actor starts and watches: ``ping`` fails once
    the child has exited, and the child exits when this actor does.
    """

    def __init__(self, request: ReplicaRequest, control_plane_ip: str) -> None:
        self._request = request
        self._control_plane_ip = control_plane_ip
        os.environ.update(pinned_env(request.gpu_indices, request.cpus))
        pin_serving(request.serving_cores)  # off training's cores; its serving process inherits it
        self._child: subprocess.Popen[bytes] | None = None

    def start(self) -> dict[str, Any]:
        req = self._request
        node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        host = listen_host(node_ip, self._control_plane_ip)
        # A router on this machine takes the Unix socket; mkdtemp's 0700 directory keeps
        # other users off it (and the path short: a socket's path has at most 107 bytes).
        unix_path = (
            str(Path(tempfile.mkdtemp(prefix="jw-replica-")) / "channel.sock")
            if host == "127.0.0.1"
            else None
        )
        secret = new_secret()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p
        )
        self._child = subprocess.Popen(
            [sys.executable, "-m", "workers.replica_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._child.stdin is not None and self._child.stdout is not None
        self._child.stdin.write(launch_config(req, secret, host, unix_path))
        self._child.stdin.flush()  # stdin stays open: the child serves until it closes
        line = self._child.stdout.readline()
        info: dict[str, Any] = json.loads(line) if line.strip() else {}
        if "pid" not in info:
            code = self._child.wait()
            if unix_path is not None:
                shutil.rmtree(Path(unix_path).parent, ignore_errors=True)
            why = info.get("error", f"the replica process exited with code {code}")
            raise RuntimeError(why)
        # The post-start block: the child's pid holds the model (and its GPU memory).
        child_pid: int = info["pid"]
        if req.simulated_usage_dir and req.gpu_indices:
            write_usage(
                Path(req.simulated_usage_dir),
                req.replica_id,
                child_pid,
                list(req.gpu_indices),
                req.gpu_memory_bytes,
            )
        register_replica(
            req.node_dir, req.replica_id, child_pid, req.gpu_indices, req.gpu_memory_bytes
        )
        return {**info, "secret": secret}

    def ping(self) -> int:
        """The serving process's pid; an error once it has exited."""
        child = self._child
        if child is None or child.poll() is not None:
            code = child.returncode if child is not None else None
            raise RuntimeError(f"the replica's serving process exited with code {code}")
        return child.pid


@dataclasses.dataclass
class _Replica:
    actor: Any
    request: ReplicaRequest
    start: Any  # ObjectRef of start()
    ping: Any = None  # ObjectRef of the outstanding liveness ping
    status: ReplicaStatus | None = None
    unix_path: str | None = None  # its channel's Unix socket, removed at stop


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
            rep.unix_path = rep.status.unix_path
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
            unix_path=info["unix_path"],
        )

    def stop(self, replica_id: str) -> None:
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        ray.kill(rep.actor, no_restart=True)  # the router has drained it already
        release_replica(rep.request.node_dir, replica_id)
        if rep.unix_path:  # the socket is on this machine
            shutil.rmtree(Path(rep.unix_path).parent, ignore_errors=True)
        if rep.request.simulated_usage_dir:
            remove_usage(Path(rep.request.simulated_usage_dir), replica_id)
