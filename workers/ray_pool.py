"""The warm pool: per Ray node, idle training worker actors each holding a warm job process.

Launching a job on a node takes one of its idle pool workers (a
:class:`~workers.ray_executor.TrainingWorker` already created, its job process
already importing torch and MLflow: :mod:`workers.warm_process`) and hands it the
job, so that no actor and no Python start-up is on the path to the job's first
step. A taken worker is the job's worker from then on (one job per worker, never
reused) and the pool refills in the background, ``refill_delay_s`` after the take
so that the new process's imports do not compete with the job's start for CPU.

Pool workers are detached actors named ``jobworker-warm-<node id>-<suffix>``: a
restarted control plane finds them, idle or holding a job (``held()``), and keeps
using both. :meth:`WarmPool.close` (a clean shutdown) kills the idle ones only.

Example::

    pool = WarmPool("jobworker", Path(".jobworker/work"), size_per_node=1, make=factory)
    pool.refill()
    actor = pool.take(node_id, key)  # None: no ready pool worker on that node (start cold)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from workers.interface.executor import WarmPoolStatus
from workers.ray_calls import gather

log = logging.getLogger(__name__)

POOL_PREFIX = "jobworker-warm-"
READY_TIMEOUT_S = 300.0  # how long a pool worker may take to import everything


@dataclass
class _Idle:
    actor: Any
    name: str
    ready: Any  # the ObjectRef of its wait_warm call: the warm pid, or None


@dataclass
class _Node:
    idle: list[_Idle] = field(default_factory=list)
    taken_at_s: float = 0.0  # monotonic time of the last take


class WarmPool:
    """Idle pool workers per node; ``make(name, node_id)`` creates one (a detached actor)."""

    def __init__(
        self,
        namespace: str,
        size_per_node: int,
        make: Callable[[str, str], Any],
        refill_delay_s: float = 2.0,
        call_timeout_s: float = 10.0,
        status_timeout_s: float = 1.0,
    ) -> None:
        self._namespace = namespace
        self.size_per_node = size_per_node
        self._make = make
        self._refill_delay_s = refill_delay_s
        self._call_timeout_s = call_timeout_s
        self._status_timeout_s = status_timeout_s  # GET /cluster waits no longer on a hung one
        self._nodes: dict[str, _Node] = {}
        self._held: dict[str, Any] = {}  # worker key -> pool worker, learnt at discovery
        self._lock = threading.Lock()
        self._discovered = False

    def take(self, node_id: str, key: str) -> Any | None:
        """A ready idle pool worker on ``node_id``, from now on worker ``key``'s; None if there
        is none."""
        self._discover()
        with self._lock:
            node = self._nodes.setdefault(node_id, _Node())
            if not node.idle:
                return None
            done, _ = ray.wait([i.ready for i in node.idle], num_returns=len(node.idle), timeout=0)
            for idle in list(node.idle):
                if idle.ready not in done:
                    continue
                node.idle.remove(idle)
                try:
                    pid = ray.get(idle.ready)
                except ray.exceptions.RayError:  # the worker died: its node, or a kill
                    continue
                if pid is None:  # its warm process died
                    ray.kill(idle.actor)
                    continue
                node.taken_at_s = time.monotonic()
                self._held[key] = idle.actor
                return idle.actor
        return None

    def holder(self, key: str) -> Any | None:
        """The pool worker that runs worker ``key`` (also one an earlier control plane took)."""
        self._discover()
        with self._lock:
            return self._held.get(key)

    def held_keys(self) -> set[str]:
        """Worker keys that pool workers run."""
        self._discover()
        with self._lock:
            return set(self._held)

    def forget(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def refill(self) -> None:
        """Create pool workers on every alive node that has fewer idle ones than its size."""
        if self.size_per_node <= 0:
            return
        self._discover()
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
        now_s = time.monotonic()
        with self._lock:
            for node_id in alive:
                node = self._nodes.setdefault(node_id, _Node())
                if now_s - node.taken_at_s < self._refill_delay_s:
                    continue
                while len(node.idle) < self.size_per_node:
                    name = f"{POOL_PREFIX}{node_id}-{uuid.uuid4().hex[:8]}"
                    actor = self._make(name, node_id)
                    ready = actor.wait_warm.remote(READY_TIMEOUT_S)
                    node.idle.append(_Idle(actor, name, ready))

    def status(self) -> list[WarmPoolStatus]:
        """Per node: the pool's size, its idle ready workers and their memory."""
        self._discover()
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
        with self._lock:
            idle = {
                i.name: (node_id, i.actor) for node_id, n in self._nodes.items() for i in n.idle
            }
            nodes = sorted({*alive, *self._nodes})
        infos = gather(
            {name: actor.warm_info.remote() for name, (_, actor) in idle.items()},
            self._status_timeout_s,
        )
        ready: dict[str, int] = dict.fromkeys(nodes, 0)
        rss: dict[str, int] = dict.fromkeys(nodes, 0)
        for name, info in infos.items():
            node_id = idle[name][0]
            if isinstance(info, dict) and info["ready"]:
                ready[node_id] += 1
                rss[node_id] += int(info["rss_bytes"])
        return [WarmPoolStatus(n, self.size_per_node, ready[n], rss[n]) for n in nodes]

    def close(self) -> None:
        """Kill the idle pool workers (a clean shutdown); workers running jobs stay."""
        with self._lock:
            idle = [i for n in self._nodes.values() for i in n.idle]
            self._nodes.clear()
        for i in idle:
            ray.kill(i.actor)

    def _discover(self) -> None:
        """Once: adopt the pool workers an earlier control plane left, idle or running a job."""
        if self._discovered:
            return
        names = [
            n["name"]
            for n in ray.util.list_named_actors(all_namespaces=True)
            if n["namespace"] == self._namespace and n["name"].startswith(POOL_PREFIX)
        ]
        actors: dict[str, Any] = {}
        for name in names:
            try:
                actors[name] = ray.get_actor(name, namespace=self._namespace)
            except ValueError:  # gone meanwhile
                continue
        answers = gather({n: a.held.remote() for n, a in actors.items()}, self._call_timeout_s)
        with self._lock:
            if self._discovered:
                return
            for name, answer in answers.items():
                if isinstance(answer, BaseException):
                    continue
                if answer is not None:
                    self._held[answer] = actors[name]
                    continue
                node_id = name.removeprefix(POOL_PREFIX).rsplit("-", 1)[0]
                ready = actors[name].wait_warm.remote(READY_TIMEOUT_S)
                self._nodes.setdefault(node_id, _Node()).idle.append(
                    _Idle(actors[name], name, ready)
                )
            self._discovered = True
