"""The real-time lane's controller: keeps each deployment's replicas as its spec says.

Called by the reconcile loop each pass, before batch jobs are placed (the
real-time lane goes first). Per deployment it pins the model URI to a version
(an alias is re-read every few seconds, so moving it rolls the deployment),
polls the replicas, asks the autoscaling policy how many it needs, places new
replicas with the same placement code as jobs (a GPU may be shared by
memory), and tells the router which replicas take traffic. A rollout starts
the new replicas first and switches traffic only once enough of them are
ready; old replicas drain, then stop. A dead replica is replaced.

Resolving a model asks MLflow, which may stall for minutes (its client retries).
That runs on a small thread pool: a pass waits for the answers at most
``resolve_wait_s`` in all, and picks up a late answer at a later pass, so a
frozen MLflow server never freezes the reconcile loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from scheduler.core.autoscale import AutoscaleConfig, AutoscaleState, LoadSample, decide
from scheduler.core.backoff import backoff_s
from scheduler.core.model import ClusterSnapshot, Demand, Holding, PlacementPolicy
from scheduler.core.placement import place
from scheduler.core.states import DeploymentState
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import ReplicaEndpoint, RouteConfig, Router
from scheduler.realtime.spec import DeploymentSpec
from scheduler.realtime.store import DeploymentRecord, DeploymentStore
from workers.interface.replicas import (
    ReplicaLauncher,
    ReplicaPhase,
    ReplicaRequest,
    ReplicaStatus,
    ResolvedModel,
)
from workers.interface.telemetry import GIB, NodeReading

log = logging.getLogger(__name__)

Resolver = Callable[[str], ResolvedModel]


@dataclass
class ServeSettings:
    tracking_uri: str
    python_path: tuple[str, ...] = ()
    simulated_usage_dir: str | None = None
    node_dir: str | None = None  # the nodes' state directory (workers/node_dir.py)
    serving_cores: int = 1  # each node's first cores serve: replicas are pinned to them
    resolve_every_s: float = 2.0
    resolve_wait_s: float = 1.0  # what a pass waits for MLflow, for all deployments together
    resolve_slow_s: float = 10.0  # no answer this long: the deployment's status says so
    drain_timeout_s: float = 30.0
    retry_backoff_s: float = 5.0  # a replica that failed to start; doubles, up to the max
    retry_backoff_max_s: float = 80.0


@dataclass
class _Replica:
    id: str
    key: tuple[str, str]  # (spec generation, pinned model URI)
    resolved: ResolvedModel
    node_id: str
    hostname: str
    gpu_indices: tuple[int, ...]
    holding: Holding
    started_at: float
    status: ReplicaStatus
    retiring_since: float | None = None


@dataclass
class _Deployment:
    name: str
    spec: DeploymentSpec
    generation: str
    resolved: ResolvedModel | None = None
    resolved_from: str | None = None  # the spec's model URI that `resolved` answers
    resolved_at: float = float("-inf")
    resolve_error: str | None = None
    resolving: tuple[str, Future[ResolvedModel]] | None = None  # (model URI, MLflow's answer)
    resolving_since: float = 0.0
    resolve_slow: str | None = None  # MLflow has not answered for a while
    replicas: dict[str, _Replica] = field(default_factory=dict)
    autoscale: AutoscaleState | None = None
    routed: tuple[str, ...] = ()
    start_error: str | None = None
    replaced: str | None = None  # why the last replica that had served was replaced
    retry_at: float = float("-inf")
    failures: int = 0
    waiting: str | None = None  # why a needed replica could not be placed


def generation_of(spec: DeploymentSpec) -> str:
    """A short hash of the parts of a spec that a replica is built from."""
    keep = spec.model_dump(
        mode="json", include={"model", "resources", "batching", "allow_pickled_model"}
    )
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


class DeploymentController:
    """Reconciles stored deployments with live replicas (one thread: the loop's).

    Example::

        controller = DeploymentController(store, launcher, router, metrics, resolver, settings)
        controller.reconcile(snapshot_fn, policy)   # once per loop pass
    """

    def __init__(
        self,
        store: DeploymentStore,
        launcher: ReplicaLauncher,
        router: Router,
        metrics: ServingMetrics,
        resolver: Resolver,
        settings: ServeSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._launcher = launcher
        self._router = router
        self._metrics = metrics
        self._resolver = resolver
        self._settings = settings
        self._clock = clock
        self._deps: dict[str, _Deployment] = {}
        self._views: dict[str, list[dict[str, Any]]] = {}
        self._mlflow = ThreadPoolExecutor(max_workers=4, thread_name_prefix="jobworker-resolve")

    # -- read by the API (any thread) ----------------------------------------------------
    def replicas_view(self, name: str) -> list[dict[str, Any]]:
        return self._views.get(name, [])

    def holdings(self) -> tuple[Holding, ...]:
        """What the replicas hold, for the batch lane's placement."""
        return tuple(r.holding for d in list(self._deps.values()) for r in d.replicas.values())

    def replica_holdings(self) -> tuple[tuple[str, Holding], ...]:
        """What each replica holds, with its deployment's name (``GET /cluster``'s shares)."""
        return tuple(
            (d.name, r.holding) for d in list(self._deps.values()) for r in d.replicas.values()
        )

    def placed(self) -> list[tuple[DeploymentSpec, frozenset[str]]]:
        """Each deployment's spec and the nodes its replicas run on (the SLO guard's view)."""
        return [
            (d.spec, frozenset(r.node_id for r in list(d.replicas.values())))
            for d in list(self._deps.values())
        ]

    def close(self) -> None:
        """Stop every replica (the control plane is shutting down)."""
        for name in list(self._deps):
            self._teardown(self._deps.pop(name))
        self._mlflow.shutdown(wait=False, cancel_futures=True)

    # -- one pass (the loop's thread) ----------------------------------------------------
    def reconcile(
        self,
        snapshot: Callable[[], ClusterSnapshot],
        policy: PlacementPolicy,
        preempt: Callable[[Demand], str | None] | None = None,
    ) -> None:
        """One pass; ``preempt`` (the batch lane's) makes room for a replica that fits nowhere."""
        records = {r.name: r for r in self._store.list()}
        for name in list(self._deps):
            if name not in records:
                self._teardown(self._deps.pop(name))
        now = self._clock()
        snap = _once(snapshot)
        for dep in self._deps.values():
            dep.waiting = None
        wanted: list[tuple[_Deployment, Demand]] = []
        deps = [self._sync(record) for record in records.values()]
        asked = [answer for dep in deps if (answer := self._ask(dep, now)) is not None]
        if asked:  # a question asked in an earlier pass is not waited for again
            wait(asked, timeout=self._settings.resolve_wait_s)
        for dep in deps:
            self._resolve(dep, now)
            self._poll(dep, now)
            wanted.extend((dep, demand) for demand in self._demands(dep, now, snap))
        self._start(wanted, snap, policy, now, preempt)
        for dep in self._deps.values():
            self._route(dep, now)
            self._retire(dep, now)
            self._report(dep, records[dep.name])

    def _sync(self, record: DeploymentRecord) -> _Deployment:
        generation = generation_of(record.spec)
        dep = self._deps.get(record.name)
        spec = record.spec
        if dep is None:
            dep = self._deps[record.name] = _Deployment(record.name, spec, generation)
        elif dep.generation != generation:  # redeployed with a new spec: re-resolve, roll
            dep.generation, dep.resolved_at = generation, float("-inf")
            dep.failures, dep.retry_at, dep.start_error = 0, float("-inf"), None
        dep.spec = spec  # changes that need no new replicas (count, SLO) apply at once
        self._router.configure(
            RouteConfig(
                name=dep.name,
                max_batch_size=spec.batching.max_batch_size,
                max_wait_ms=spec.batching.max_wait_ms,
                slo_p99_ms=spec.slo.p99_ms,
                max_queue=spec.max_queue,
                team=spec.team,
            )
        )
        return dep

    def _ask(self, dep: _Deployment, now: float) -> Future[ResolvedModel] | None:
        """Ask MLflow (off this thread) for the model's version when it is time to; the
        answer to come, or None when nothing was asked."""
        if dep.resolving is not None:
            return None
        if (
            dep.resolved is not None
            and not dep.spec.tracks_alias
            and dep.resolved_from == dep.spec.model  # redeployed to another model: ask
        ):
            return None
        if now - dep.resolved_at < self._settings.resolve_every_s:
            return None
        dep.resolved_at = now
        answer = self._mlflow.submit(self._resolver, dep.spec.model)
        dep.resolving, dep.resolving_since = (dep.spec.model, answer), now
        return answer

    def _resolve(self, dep: _Deployment, now: float) -> None:
        """Take MLflow's answer, if it came; say so in the status if it is long in coming."""
        if dep.resolving is None:
            return
        model, answer = dep.resolving
        if not answer.done():
            waited = now - dep.resolving_since
            if waited >= self._settings.resolve_slow_s:
                dep.resolve_slow = f"MLflow has not answered for {waited:.0f} s; still asking"
            return
        dep.resolving, dep.resolve_slow = None, None
        if model != dep.spec.model:  # redeployed meanwhile: ask again for the new one
            dep.resolved_at = float("-inf")
            return
        try:
            resolved = answer.result()
        except Exception as exc:  # keep serving what runs; say why in the status
            dep.resolve_error = str(exc)
            return
        dep.resolve_error, dep.resolved_from = None, model
        if dep.resolved is None or resolved.uri != dep.resolved.uri:
            log.info("deployment %s: model %s -> %s", dep.name, dep.spec.model, resolved.uri)
            dep.resolved = resolved
            dep.failures, dep.retry_at, dep.start_error = 0, float("-inf"), None

    def _target(self, dep: _Deployment) -> tuple[str, str] | None:
        return (dep.generation, dep.resolved.uri) if dep.resolved else None

    def _poll(self, dep: _Deployment, now: float) -> None:
        if not dep.replicas:
            return
        statuses = self._launcher.poll(list(dep.replicas))
        for rid, status in statuses.items():
            rep = dep.replicas[rid]
            served = rep.status.phase is ReplicaPhase.READY
            rep.status = status
            if status.phase is ReplicaPhase.READY and status.pid and rep.holding.pid is None:
                rep.holding = _with_pid(rep.holding, status.pid)
            # A replica that dies before it ever served is a start failure: back off too.
            if status.phase is ReplicaPhase.FAILED or (
                status.phase is ReplicaPhase.DEAD and not served
            ):
                dep.failures += 1
                dep.start_error = status.error
                cfg = self._settings
                dep.retry_at = now + backoff_s(
                    dep.failures, cfg.retry_backoff_s, cfg.retry_backoff_max_s
                )
                log.warning("deployment %s: replica %s failed: %s", dep.name, rid, status.error)
                self._stop(dep, rid)
            elif status.phase is ReplicaPhase.DEAD:
                log.warning("deployment %s: replica %s died: %s", dep.name, rid, status.error)
                dep.replaced = f"replica {rid} was replaced: {status.error}"
                self._stop(dep, rid)

    def _desired(self, dep: _Deployment, now: float) -> int:
        spec = dep.spec
        load = self._router.load(dep.name)
        self._metrics.queue_depth(dep.name, load.queue_depth)
        target = self._target(dep)
        serving = sum(
            1 for r in dep.replicas.values() if r.key == target and r.retiring_since is None
        )
        sample = LoadSample(
            replicas=max(serving, 1),
            queue_depth=load.queue_depth,
            in_flight=load.in_flight,
            p99_ms=load.p99_ms,
        )
        desired, dep.autoscale = decide(AutoscaleConfig.from_spec(spec), sample, dep.autoscale, now)
        return desired

    def _demands(
        self, dep: _Deployment, now: float, snapshot: Callable[[], ClusterSnapshot]
    ) -> list[Demand]:
        target = self._target(dep)
        desired = self._desired(dep, now)
        if target is None or now < dep.retry_at:
            return []
        current = [r for r in dep.replicas.values() if r.key == target and r.retiring_since is None]
        if len(current) > desired:  # scale down: newest first
            for rep in sorted(current, key=lambda r: -r.started_at)[: len(current) - desired]:
                rep.retiring_since = now
        missing = desired - len(current)
        if missing <= 0:
            return []
        res = dep.spec.resources
        gpus = res.gpus
        gpu_bytes = 0
        if gpus and res.gpu_fraction is not None:
            # A fraction is taken of the smallest GPU: never more than asked on any GPU.
            totals = [t for n in snapshot().nodes for g in n.gpus if (t := g.memory_total_bytes)]
            if not totals:
                dep.waiting = "gpu_fraction needs a GPU that reports its total memory; none does"
                return []
            gpu_bytes = res.gpu_memory_bytes(min(totals))
        elif gpus:
            gpu_bytes = res.gpu_memory_bytes(None)
        return [
            Demand(
                job_id=f"{dep.name}-{secrets.token_hex(3)}",
                gpus=gpus,
                gpu_memory_bytes=gpu_bytes,
                cpus=res.cpus,
                memory_bytes=int(res.memory_gb * GIB),
                gpu_type=res.gpu_type,
                shared=gpus == 1,
            )
            for _ in range(missing)
        ]

    def _start(
        self,
        wanted: list[tuple[_Deployment, Demand]],
        snapshot: Callable[[], ClusterSnapshot],
        policy: PlacementPolicy,
        now: float,
        preempt: Callable[[Demand], str | None] | None,
    ) -> None:
        if not wanted:
            return
        snap = snapshot()
        decisions = place(snap, [d for _, d in wanted], policy)
        nodes: dict[str, NodeReading] = {n.node_id: n for n in snap.nodes}
        preempted = False
        for (dep, demand), decision in zip(wanted, decisions, strict=True):
            if not decision.placed or dep.resolved is None:
                dep.waiting = "; ".join(decision.reasons) or "no node"
                # The real-time lane outranks batch jobs: make room, one replica a pass.
                if preempt is not None and demand.gpus and not preempted:
                    preempted = True
                    action = preempt(demand)
                    if action:
                        dep.waiting = action
                continue
            target = decision.placement[0]
            hostname = nodes[target.node_id].hostname if target.node_id in nodes else "?"
            request = ReplicaRequest(
                replica_id=demand.job_id,
                deployment=dep.name,
                model_uri=dep.resolved.uri,
                tracking_uri=self._settings.tracking_uri,
                node_id=target.node_id,
                gpu_indices=target.gpu_indices,
                gpu_memory_bytes=demand.gpu_memory_bytes,
                cpus=demand.cpus,
                max_batch_size=dep.spec.batching.max_batch_size,
                python_path=self._settings.python_path,
                simulated_usage_dir=self._settings.simulated_usage_dir,
                node_dir=self._settings.node_dir,
                serving_cores=self._settings.serving_cores,
                allow_pickled_model=dep.spec.allow_pickled_model,
            )
            holding = Holding(
                job_id=demand.job_id,
                node_id=target.node_id,
                gpu_uuids=target.gpu_uuids,
                gpu_memory_bytes=demand.gpu_memory_bytes,
                cpus=demand.cpus,
                memory_bytes=demand.memory_bytes,
                shared=demand.shared,
            )
            key = (dep.generation, dep.resolved.uri)
            dep.replicas[demand.job_id] = _Replica(
                id=demand.job_id,
                key=key,
                resolved=dep.resolved,
                node_id=target.node_id,
                hostname=hostname,
                gpu_indices=target.gpu_indices,
                holding=holding,
                started_at=now,
                status=ReplicaStatus(demand.job_id, ReplicaPhase.STARTING),
            )
            self._launcher.start(request)

    def _route(self, dep: _Deployment, now: float) -> None:
        """Route to the old version until every new replica is ready, then switch at once."""
        target = self._target(dep)
        live = [r for r in dep.replicas.values() if r.retiring_since is None]
        new = [r for r in live if r.key == target]
        old = [r for r in live if r.key != target and r.status.phase is ReplicaPhase.READY]
        switch = bool(new) and all(r.status.phase is ReplicaPhase.READY for r in new)
        if switch or not old:
            for rep in old:
                rep.retiring_since = now
            routed = [r for r in new if r.status.phase is ReplicaPhase.READY]
        else:
            routed = old
        ids = tuple(sorted(r.id for r in routed))
        if ids != dep.routed:
            dep.routed = ids
            self._router.set_replicas(dep.name, [_endpoint(r) for r in routed])
        views = [_view(r, r.id in ids) for r in dep.replicas.values()]
        self._views[dep.name] = views

    def _retire(self, dep: _Deployment, now: float) -> None:
        for rep in list(dep.replicas.values()):
            if rep.retiring_since is None:
                continue
            drained = self._router.drained(dep.name, rep.id)
            if drained or now - rep.retiring_since > self._settings.drain_timeout_s:
                self._stop(dep, rep.id)

    def _stop(self, dep: _Deployment, replica_id: str) -> None:
        dep.replicas.pop(replica_id, None)
        try:
            self._launcher.stop(replica_id)
        except Exception:
            log.exception("stopping replica %s failed", replica_id)

    def _teardown(self, dep: _Deployment) -> None:
        self._router.remove(dep.name)
        for rid in list(dep.replicas):
            self._stop(dep, rid)
        self._views.pop(dep.name, None)

    def _report(self, dep: _Deployment, record: DeploymentRecord) -> None:
        state, message = self._state(dep)
        serving = [dep.replicas[i] for i in dep.routed if i in dep.replicas]
        resolved = serving[0].resolved if serving else dep.resolved
        version = resolved.version if resolved else None
        run_id = resolved.run_id if resolved else None
        if (state, message, version, run_id) != (
            record.state,
            record.message,
            record.model_version,
            record.run_id,
        ):
            self._store.transition(dep.name, state, message, version, run_id)

    def _state(self, dep: _Deployment) -> tuple[DeploymentState, str | None]:
        target = self._target(dep)
        routed = [dep.replicas[i] for i in dep.routed if i in dep.replicas]
        if not routed:
            if dep.resolve_slow and dep.resolved is None:
                return DeploymentState.DEPLOYING, f"resolving the model: {dep.resolve_slow}"
            if dep.resolve_error and dep.resolved is None:
                return DeploymentState.FAILED, f"cannot resolve the model: {dep.resolve_error}"
            if dep.start_error:
                return DeploymentState.FAILED, f"replica failed to start: {dep.start_error}"
            if dep.waiting:
                return DeploymentState.DEPLOYING, f"waiting for capacity: {dep.waiting}"
            if dep.replaced:
                return DeploymentState.DEPLOYING, f"starting replicas; {dep.replaced}"
            return DeploymentState.DEPLOYING, "starting replicas"
        notes = [f"model: {e}" for e in (dep.resolve_slow, dep.resolve_error) if e]
        if dep.waiting:
            notes.append(f"waiting for capacity: {dep.waiting}")
        if dep.start_error:
            notes.append(f"a replica failed to start: {dep.start_error}")
        if dep.replaced:
            notes.append(dep.replaced)
        if any(r.key != target for r in routed):
            return DeploymentState.UPDATING, "; ".join(["rolling to a new version", *notes])
        return DeploymentState.READY, "; ".join(notes) or None


def _once(fn: Callable[[], ClusterSnapshot]) -> Callable[[], ClusterSnapshot]:
    """``fn`` called at most once (telemetry is read once per pass)."""
    memo: list[ClusterSnapshot] = []

    def call() -> ClusterSnapshot:
        if not memo:
            memo.append(fn())
        return memo[0]

    return call


def _with_pid(h: Holding, pid: int) -> Holding:
    return Holding(
        h.job_id, h.node_id, h.gpu_uuids, h.gpu_memory_bytes, h.cpus, h.memory_bytes, pid, h.shared
    )


def _endpoint(rep: _Replica) -> ReplicaEndpoint:
    st = rep.status
    assert st.host is not None and st.port is not None and st.secret is not None
    return ReplicaEndpoint(
        replica_id=rep.id,
        host=st.host,
        port=st.port,
        secret=st.secret,
        model_name=rep.resolved.name or rep.resolved.uri,
        model_version=rep.resolved.version,
        run_id=rep.resolved.run_id,
        input_shape=st.input_shape,
        input_dtype=st.input_dtype,
        unix_path=st.unix_path,
    )


def _view(rep: _Replica, routed: bool) -> dict[str, Any]:
    return {
        "id": rep.id,
        "phase": rep.status.phase.value,
        "routed": routed,
        "retiring": rep.retiring_since is not None,
        "node": rep.hostname,
        "gpu_indices": list(rep.gpu_indices),
        "gpu_memory_bytes": rep.holding.gpu_memory_bytes,
        "model_version": rep.resolved.version,
        "model_uri": rep.resolved.uri,
        "error": rep.status.error,
    }
