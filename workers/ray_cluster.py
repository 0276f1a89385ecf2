"""The cluster view on Ray: one node agent actor per node, sampling GPU telemetry.

:class:`RayCluster` keeps exactly one :class:`NodeAgent` on every live Ray
node (pinned there by hard node affinity), notices nodes that join or leave,
and returns the agents' latest readings as the scheduler's cluster snapshot.
A node is simulated when NVML finds no GPU there (or when asked to be):
its GPUs come from the cluster config entry that names it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.interface.telemetry import GIB, GpuBackend, NodeId, NodeReading
from workers.memory_caps import DEFAULT_GRACE_S, CapWatchdog, caps_dir
from workers.ray_calls import gather
from workers.sim_backend import SimClusterSpec, SimNodeSpec, select_backend

log = logging.getLogger(__name__)

SIM_NODE_RESOURCE = "jobworker_sim_node_"  # + name: marks which config entry a Ray node is
_AGENT_PREFIX = "jobworker-agent-"


@ray.remote(num_cpus=0, max_concurrency=4)  # type: ignore[call-overload]
class NodeAgent:
    """Samples its node's GPUs every ``interval_s`` and serves the latest reading.

    With a ``node_dir``, each sample also enforces the GPU memory caps registered there
    (:class:`~workers.memory_caps.CapWatchdog`: a process over its cap for
    ``cap_grace_s`` is stopped, with the reason; ``cap_grace_s=None`` turns it off).
    """

    def __init__(
        self,
        node_id: str,
        hostname: str,
        cpus: int,
        memory_total_bytes: int,
        mode: str,
        sim_node: dict[str, Any] | None,
        usage_dir: str | None,
        interval_s: float,
        node_dir: str | None = None,
        cap_grace_s: float | None = DEFAULT_GRACE_S,
    ) -> None:
        spec = SimNodeSpec.model_validate(sim_node) if sim_node else None
        self._backend: GpuBackend = select_backend(
            mode, spec, Path(usage_dir) if usage_dir else None
        )
        self._node_id = NodeId(node_id)
        self._hostname = hostname
        self._cpus = cpus
        self._memory_total_bytes = memory_total_bytes
        self._node_dir = Path(node_dir) if node_dir else None
        # GPU memory caps are enforced on each sample (None: the watchdog is off).
        self._watchdog = (
            CapWatchdog(caps_dir(node_dir), cap_grace_s)
            if node_dir and cap_grace_s is not None
            else None
        )
        self._lock = threading.Lock()
        self._latest = self._sample()
        self._interval_s = interval_s
        threading.Thread(target=self._loop, daemon=True).start()

    def _sample(self) -> NodeReading:
        return NodeReading(
            node_id=self._node_id,
            hostname=self._hostname,
            cpus=self._cpus,
            memory_total_bytes=self._memory_total_bytes,
            gpus=self._backend.read(),
            backend=self._backend.name,
            sampled_at=time.time(),
        )

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval_s)
            try:
                reading = self._sample()
            except Exception:  # the agent must outlive a failing driver: keep the last reading
                log.exception("telemetry sample failed")
                continue
            with self._lock:
                self._latest = reading
            if self._watchdog is not None:
                try:
                    self._watchdog.check(reading.gpus, time.monotonic())
                except Exception:  # as for the sample: log, and try again at the next one
                    log.exception("GPU memory cap check failed")

    def reading(self, fresh: bool = False) -> NodeReading:
        """The latest reading; ``fresh`` samples now (after a launch, say)."""
        if fresh:
            with self._lock:
                self._latest = self._sample()
        with self._lock:
            return self._latest


class RayCluster:
    """The :class:`~scheduler.batch.loop.ClusterSource` on Ray.

    Example::

        cluster = RayCluster(namespace="jobworker", mode="auto", sim=None, usage_dir=None)
        for node in cluster.nodes():
            print(node.hostname, [g.memory_free_bytes for g in node.gpus])
    """

    def __init__(
        self,
        namespace: str,
        mode: str = "auto",
        sim: SimClusterSpec | None = None,
        usage_dir: Path | None = None,
        interval_s: float = 2.0,
        node_dir: Path | None = None,
        call_timeout_s: float = 5.0,
        cap_grace_s: float | None = DEFAULT_GRACE_S,
    ) -> None:
        self._namespace = namespace
        self._mode = mode
        self._sim = sim
        self._usage_dir = usage_dir
        self._node_dir = node_dir
        self._cap_grace_s = cap_grace_s
        self._interval_s = interval_s
        self._call_timeout_s = call_timeout_s
        self._agents: dict[str, Any] = {}

    def _sim_node_for(self, ray_node: dict[str, Any], alone: bool) -> SimNodeSpec | None:
        if self._sim is None:
            return None
        for key in ray_node["Resources"]:
            if key.startswith(SIM_NODE_RESOURCE):
                name = key.removeprefix(SIM_NODE_RESOURCE)
                return next((n for n in self._sim.nodes if n.name == name), None)
        # A single-node Ray with a single-node config needs no marking.
        return self._sim.nodes[0] if alone and len(self._sim.nodes) == 1 else None

    def _ensure_agents(self) -> None:
        alive = [n for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
        alive_ids = {n["NodeID"] for n in alive}
        for node_id in list(self._agents):
            if node_id not in alive_ids:
                log.info("node %s left", node_id)
                del self._agents[node_id]
        for node in alive:
            node_id = node["NodeID"]
            if node_id in self._agents:
                continue
            sim = self._sim_node_for(node, alone=len(alive) == 1)
            resources = node["Resources"]
            hostname = sim.name if sim else node.get("NodeManagerHostname", socket.gethostname())
            cpus = sim.cpus if sim else int(resources.get("CPU", 1))
            memory = int(sim.memory_gb * GIB) if sim else int(resources.get("memory", 0))
            self._agents[node_id] = NodeAgent.options(  # type: ignore[attr-defined]
                name=f"{_AGENT_PREFIX}{node_id}",
                namespace=self._namespace,
                get_if_exists=True,
                lifetime="detached",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(
                node_id,
                hostname,
                cpus,
                memory,
                self._mode,
                sim.model_dump() if sim else None,
                str(self._usage_dir) if self._usage_dir else None,
                self._interval_s,
                str(self._node_dir) if self._node_dir else None,
                self._cap_grace_s,
            )
            log.info("node %s joined (%s)", node_id, hostname)

    def close(self) -> None:
        """Stop the node agents (a restarted control plane starts new ones)."""
        for agent in self._agents.values():
            ray.kill(agent)
        self._agents.clear()

    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        self._ensure_agents()
        refs = {nid: agent.reading.remote(fresh) for nid, agent in self._agents.items()}
        readings: list[NodeReading] = []
        for node_id, answer in gather(refs, self._call_timeout_s).items():
            if isinstance(answer, NodeReading):
                readings.append(answer)
            else:  # dead or hung: looked up again at the next pass
                log.warning("no telemetry from node %s: %s", node_id, answer)
                self._agents.pop(node_id, None)
        return tuple(sorted(readings, key=lambda r: r.hostname))


def connect(address: str | None, namespace: str) -> None:
    """Join the Ray cluster at ``address``, or start a local one; no-op if already joined."""
    if ray.is_initialized():
        return
    ray.init(
        # "local": always a fresh local Ray. Without it, ray.init() joins whatever cluster
        # this machine last started (/tmp/ray/ray_current_cluster), e.g. another user's.
        address=address or "local",
        namespace=namespace,
        # A local Ray (in-process, or `jobworker up`'s own head on 127.0.0.1) is reached
        # over loopback; a cluster address brings its own.
        _node_ip_address="127.0.0.1" if address is None or address.startswith("127.") else None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
