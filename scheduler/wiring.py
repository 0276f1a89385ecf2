"""The one place that builds the real collaborators and hands them to each other."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import psutil
import sqlalchemy as sa
from fastapi import FastAPI
from mlflow.tracking import MlflowClient

from scheduler import db
from scheduler.api.app import Serving, create_app
from scheduler.api.auth import Auth
from scheduler.api.console.data import ConsoleSources
from scheduler.api.guards import MIB, BodyLimits, allowed_hosts
from scheduler.api.views import cluster_table
from scheduler.auth.audit import AuditStore
from scheduler.auth.model_names import ModelNames
from scheduler.auth.tokens import TokenStore
from scheduler.batch.history import JobHistory
from scheduler.batch.lease import Lease
from scheduler.batch.loop import ACTIVE, LoopSettings, Scheduler
from scheduler.batch.metrics import ClusterStateCollector, SchedulerMetrics, gpu_counts
from scheduler.batch.predictions import Forecaster
from scheduler.batch.queue_config import QueueConfig, read_queue_config
from scheduler.batch.service import JobService
from scheduler.batch.store import JobStore
from scheduler.core.model import Mode
from scheduler.core.slo_guard import GuardSettings
from scheduler.realtime.controller import DeploymentController, ServeSettings
from scheduler.realtime.guard import SloGuardRunner
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import Router
from scheduler.realtime.service import DeploymentService
from scheduler.realtime.store import DeploymentStore
from workers.cpu_control import DEFAULT_SERVING_CORES, pin_serving
from workers.interface.replicas import ResolvedModel
from workers.interface.telemetry import GIB
from workers.memory_caps import DEFAULT_GRACE_S
from workers.mlflow_history import MlflowRunFacts
from workers.mlflow_loss import LossHistory
from workers.mlflow_models import resolve
from workers.mlflow_throttles import MlflowThrottleLog
from workers.ray_cluster import RayCluster, connect
from workers.ray_executor import RayExecutor
from workers.ray_replicas import RayReplicaLauncher
from workers.sim_backend import SimClusterSpec, SimGpuSpec, SimNodeSpec, load_cluster_config


@dataclass(frozen=True)
class Settings:
    """Where state lives and what to connect to; every field has a flag and a variable."""

    home: Path = Path(".jobworker")
    db_url: str | None = None  # default: SQLite under home
    tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_ui_url: str | None = None  # default: the tracking URI when it is http(s)
    ray_address: str | None = None  # default: a local Ray started in-process
    cluster_config: Path | None = None
    queue_config: Path | None = None
    queue_mode: Mode | None = None  # overrides the queue config's mode (its default: las)
    history_refresh_s: float = 30.0  # how often the predictor re-reads the finished jobs
    forecast_every_s: float = 2.0  # the most often the queue is forecast forward
    gpu_backend: str = "auto"  # auto | nvml | simulated
    namespace: str = "jobworker"
    loop_interval_s: float = 0.5
    lease_ttl_s: float = 5.0  # a standby takes over this long after the leader's last pass
    api_host: str = "127.0.0.1"  # the address the API binds
    api_port: int = 8000
    public_url: str | None = None  # the API's address for users; default http://host:port
    # Host names served besides api_host (and, on loopback, the loopback names); bound
    # to 0.0.0.0 with none listed, any Host is served.
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 8 * MIB  # any request body; predict bodies may use all of it
    max_config_bytes: int = 1 * MIB  # bodies of every route but predict (configs, tokens)
    token_cache_ttl_s: float = 5.0  # a verified token is trusted this long without the KDF
    metrics_public: bool = False  # serve /metrics without a token
    # A process over its GPU memory cap this long is stopped by its node agent; None: the
    # watchdog is off (torch's per-process fraction still caps the job's allocator).
    memory_cap_grace_s: float | None = DEFAULT_GRACE_S
    # CPU side of co-location (workers/cpu_control.py) and the SLO guard (core/slo_guard.py)
    serving_cores: int = DEFAULT_SERVING_CORES  # each node's first cores: API and replicas
    slo_guard: bool = True
    guard_throttle_at: float = 0.8  # fraction of a deployment's slo.p99_ms
    guard_release_at: float = 0.5
    guard_dwell_s: float = 2.0
    guard_max_throttle_s: float = 300.0
    guard_rest_s: float = 60.0
    warm_pool: int = 1  # warm job processes kept per node (0: every job starts cold)

    @property
    def admin_token_file(self) -> Path:
        """Where ``up`` keeps an admin token for the CLI on this machine (mode 0600)."""
        return self.home / "admin.token"

    @property
    def store_url(self) -> str:
        return self.db_url or db.sqlite_url((self.home / "jobs.db").resolve())

    @property
    def user_url(self) -> str:
        """Where users reach the API (and its console): MLflow runs link there."""
        return self.public_url or f"http://{self.api_host}:{self.api_port}"

    @property
    def ui_url(self) -> str | None:
        if self.mlflow_ui_url:
            return self.mlflow_ui_url
        return self.tracking_uri if self.tracking_uri.startswith("http") else None


def default_sim_cluster() -> SimClusterSpec:
    """Used when NVML finds no GPU and no cluster config is given: two simulated GPUs."""
    return SimClusterSpec(
        nodes=[
            SimNodeSpec(
                name="local",
                cpus=os.cpu_count() or 1,
                memory_gb=psutil.virtual_memory().total / GIB,
                gpus=[SimGpuSpec(type="SIM-24GB", memory_gb=24, count=2)],
            )
        ]
    )


@dataclass
class ControlPlane:
    engine: sa.Engine
    store: JobStore
    scheduler: Scheduler
    service: JobService
    cluster: RayCluster
    executor: RayExecutor
    app: FastAPI
    controller: DeploymentController
    tokens: TokenStore
    history: JobHistory
    forecaster: Forecaster
    guard: SloGuardRunner | None = None

    def start(self) -> None:
        self.history.start()
        self.forecaster.start()
        self.scheduler.start()
        if self.guard is not None:
            self.guard.start()

    def stop(self) -> None:
        if self.guard is not None:
            self.guard.stop()
        self.scheduler.stop()
        self.executor.close()
        self.forecaster.stop()
        self.history.stop()
        self.controller.close()
        self.cluster.close()
        self.engine.dispose()


def pin_to_serving_cores(settings: Settings) -> tuple[int, ...]:
    """Pin this process (the API, run by ``jobworker up``) to its node's serving cores,
    away from training's (threads started later inherit it); returns them."""
    return pin_serving(settings.serving_cores)


def build(settings: Settings) -> ControlPlane:
    """Connect to Ray and build the control plane (the loop is not started yet)."""
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)  # its user's: tokens, logins, dbs
    connect(settings.ray_address, settings.namespace)
    sim = (
        load_cluster_config(settings.cluster_config)
        if settings.cluster_config
        else default_sim_cluster()
    )
    usage_dir = home / "simgpu"
    usage_dir.mkdir(exist_ok=True)
    node_dir = home / "node"
    engine = db.connect(settings.store_url)
    store = JobStore(engine)
    tokens = TokenStore(engine, cache_ttl_s=settings.token_cache_ttl_s)
    tokens.ensure_admin_file(settings.admin_token_file)
    model_names = ModelNames(engine)
    queue = read_queue_config(settings.queue_config) if settings.queue_config else QueueConfig()
    if settings.queue_mode is not None:
        queue = queue.model_copy(update={"mode": settings.queue_mode})
    if settings.tracking_uri.startswith("sqlite:"):
        # Create MLflow's tables here, once: job processes starting together would race.
        MlflowClient(settings.tracking_uri).search_experiments(max_results=1)
    cluster = RayCluster(
        namespace=settings.namespace,
        mode=settings.gpu_backend,
        sim=sim,
        usage_dir=usage_dir,
        node_dir=node_dir,
        cap_grace_s=settings.memory_cap_grace_s,
    )
    executor = RayExecutor(
        namespace=settings.namespace,
        work_root=home / "work",
        throttle_max_s=settings.guard_max_throttle_s,
        warm_pool=settings.warm_pool,
        tracking_uri=settings.tracking_uri,
    )
    loop_settings = LoopSettings(
        tracking_uri=settings.tracking_uri,
        log_dir=home / "logs",
        interval_s=settings.loop_interval_s,
        python_path=(os.getcwd(),),
        simulated_usage_dir=str(usage_dir),
        node_dir=str(node_dir),
        serving_cores=settings.serving_cores,
        public_url=settings.user_url,
        queue=queue.policy(),
    )
    metrics = ServingMetrics()
    router = Router(metrics)

    def resolver(uri: str) -> ResolvedModel:
        return resolve(uri, settings.tracking_uri)

    deployment_store = DeploymentStore(engine)
    controller = DeploymentController(
        deployment_store,
        RayReplicaLauncher(namespace=settings.namespace),
        router,
        metrics,
        resolver,
        ServeSettings(
            tracking_uri=settings.tracking_uri,
            python_path=loop_settings.python_path,
            simulated_usage_dir=str(usage_dir),
            node_dir=str(node_dir),
            serving_cores=settings.serving_cores,
        ),
    )
    lease = Lease(engine, Lease.holder_id(), ttl_s=settings.lease_ttl_s)
    history = JobHistory(
        store, MlflowRunFacts(settings.tracking_uri), refresh_s=settings.history_refresh_s
    )
    forecaster = Forecaster(every_s=settings.forecast_every_s)
    scheduler_metrics = SchedulerMetrics()
    scheduler = Scheduler(
        store,
        executor,
        cluster,
        loop_settings,
        realtime=controller,
        lease=lease,
        history=history,
        forecaster=forecaster,
        metrics=scheduler_metrics,
    )
    scheduler_metrics.watch(
        ClusterStateCollector(
            store.count_by_state_team,
            lambda: gpu_counts(cluster.nodes(), scheduler.held_gpus()),
        )
    )
    guard = (
        SloGuardRunner(
            store,
            controller.placed,
            metrics,
            executor,
            GuardSettings(
                throttle_at=settings.guard_throttle_at,
                release_at=settings.guard_release_at,
                dwell_s=settings.guard_dwell_s,
                max_throttle_s=settings.guard_max_throttle_s,
                rest_s=settings.guard_rest_s,
            ),
            metrics=scheduler_metrics,
            throttle_log=MlflowThrottleLog(settings.tracking_uri),
            leading=lambda: scheduler.leading,
        )
        if settings.slo_guard
        else None
    )
    service = JobService(
        store,
        loop_settings.log_dir,
        wake=scheduler.wake,
        model_names=model_names,
        python_path=loop_settings.python_path,
        priority_caps=queue.priority_limits(),
        nodes=cluster.nodes,
        placement_policy=loop_settings.policy,
    )
    deployments = DeploymentService(
        deployment_store,
        resolver,
        controller.replicas_view,
        wake=scheduler.wake,
        model_names=model_names,
        run_team=store.run_team,
    )
    app = create_app(
        service,
        Auth(tokens, AuditStore(engine), metrics_public=settings.metrics_public),
        mlflow_ui_url=settings.ui_url,
        cluster_view=lambda: cluster_table(
            cluster.nodes(),
            store.find(list(ACTIVE)),
            controller.replica_holdings(),
            executor.warm_pool(),
        ),
        serving=Serving(deployments, router, metrics),
        queue_view=lambda: [dataclasses.asdict(e) for e in scheduler.queue()],
        predictions=scheduler.prediction,
        leading=lambda: scheduler.leading,
        body_limits=BodyLimits(settings.max_body_bytes, settings.max_config_bytes),
        allowed_hosts=allowed_hosts(settings.api_host, settings.allowed_hosts),
        console=ConsoleSources(
            quotas=queue.quotas, loss_history=LossHistory(settings.tracking_uri)
        ),
        metrics=lambda: scheduler_metrics.render() + metrics.render(),
    )
    return ControlPlane(
        engine,
        store,
        scheduler,
        service,
        cluster,
        executor,
        app,
        controller,
        tokens,
        history,
        forecaster,
        guard,
    )
