"""A real replica actor's serving process: a plain child of the actor that holds the model,
serves the channel over TCP and, for a router on its machine, a Unix socket; it dies with
its actor, and its crash is reported as the replica's death (which the controller replaces).

Real Ray (the session's), a real MLflow registry, a pt2 model; waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import ReplicaEndpoint, RouteConfig, Router
from tests.conftest import wait_until
from tests.security.models import DIM, Registry, linear
from workers.interface.replicas import ReplicaPhase, ReplicaRequest, ReplicaStatus
from workers.ray_replicas import ACTOR_PREFIX, RayReplicaLauncher

NAMESPACE = "jw-replica-process"
GUARD_S = 10.0


@pytest.fixture
def launcher() -> Iterator[RayReplicaLauncher]:
    launcher = RayReplicaLauncher(namespace=NAMESPACE)
    started: list[str] = []
    real_start = launcher.start

    def start(request: ReplicaRequest) -> None:
        started.append(request.replica_id)
        real_start(request)

    launcher.start = start  # type: ignore[method-assign]
    yield launcher
    for rid in started:
        launcher.stop(rid)


def _start_ready(launcher: RayReplicaLauncher, tmp_path: Path, replica_id: str) -> ReplicaStatus:
    registry = Registry.create(tmp_path)
    request = ReplicaRequest(
        replica_id=replica_id,
        deployment="proc",
        model_uri=registry.log("pt2", linear(), serialization_format="pt2"),
        tracking_uri=registry.tracking_uri,
        node_id=ray.get_runtime_context().get_node_id(),
        gpu_indices=(),
        gpu_memory_bytes=0,
        cpus=1,
        max_batch_size=4,
    )
    launcher.start(request)

    def ready() -> ReplicaStatus | None:
        status = launcher.poll([replica_id])[replica_id]
        assert status.phase in (ReplicaPhase.STARTING, ReplicaPhase.READY), status
        return status if status.phase is ReplicaPhase.READY else None

    return wait_until(ready, f"replica {replica_id} is ready", 150)


def _serving_process(status: ReplicaStatus) -> psutil.Process:
    assert status.pid is not None
    proc = psutil.Process(status.pid)
    assert "workers.replica_process" in proc.cmdline()
    return proc


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(240)
def test_same_host_replica_is_reached_over_its_unix_socket_and_a_child_crash_is_its_death(
    ray_session: None, tmp_path: Path, launcher: RayReplicaLauncher
) -> None:
    status = _start_ready(launcher, tmp_path, "proc-unix")
    child = _serving_process(status)
    assert child.pid != os.getpid()
    assert status.unix_path is not None and status.secret is not None
    sock_dir = Path(status.unix_path).parent
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700  # only this user reaches it

    # A TCP port where nothing listens: the answer can only come over the Unix socket.
    endpoint = ReplicaEndpoint(
        replica_id="proc-unix",
        host="127.0.0.1",
        port=_closed_port(),
        model_name="proc",
        model_version="1",
        run_id=None,
        input_shape=status.input_shape,
        input_dtype=status.input_dtype,
        secret=status.secret,
        unix_path=status.unix_path,
    )

    async def predict() -> np.ndarray:
        router = Router(ServingMetrics())
        router.bind(asyncio.get_running_loop())
        router.configure(RouteConfig("proc", 4, 0, 10_000, 16))
        router.set_replicas("proc", [endpoint])
        while not router.routed("proc"):
            await asyncio.sleep(0.01)
        try:
            return (await router.predict("proc", np.ones((2, DIM), np.float32))).outputs
        finally:
            router.remove("proc")

    async def bounded() -> np.ndarray:
        return await asyncio.wait_for(predict(), GUARD_S)

    assert asyncio.run(bounded()).shape == (2, 3)
    assert any(c.laddr == status.unix_path for c in child.net_connections(kind="unix"))

    child.send_signal(signal.SIGKILL)  # the model process crashes: the replica is dead

    def dead() -> ReplicaStatus | None:
        now = launcher.poll(["proc-unix"])["proc-unix"]
        return now if now.phase is ReplicaPhase.DEAD else None

    died = wait_until(dead, "the replica is reported dead", 60)
    assert died.error is not None and "serving process exited" in died.error
    launcher.stop("proc-unix")
    assert not sock_dir.exists()  # stop() cleans the socket's directory on this machine


@pytest.mark.timeout(240)
def test_serving_process_dies_with_its_actor(
    ray_session: None, tmp_path: Path, launcher: RayReplicaLauncher
) -> None:
    status = _start_ready(launcher, tmp_path, "proc-orphan")
    child = _serving_process(status)
    ray.kill(ray.get_actor(f"{ACTOR_PREFIX}proc-orphan", namespace=NAMESPACE))
    wait_until(lambda: _gone(child), "the serving process exits after its actor", 60)
