"""The :class:`~workers.interface.executor.Executor` on Ray: one training worker actor per attempt.

Both halves live here: :class:`RayExecutor` in the control plane, and the
:class:`TrainingWorker` actor it starts on a node. Each actor is pinned to the
node the scheduler chose with a hard node-affinity strategy; it reserves no Ray
CPUs or GPUs, because the scheduler, not Ray's logical counts, owns the
assignment. A multi-node job has one actor per node (``jobworker-train-<job>``
for rank 0, ``…-<job>.r<k>`` for rank k), polled, stopped and released together.

With a warm pool (``warm_pool`` per node, :mod:`workers.ray_pool`), a job is
handed to an idle pool worker created beforehand, whose job process already
imported torch and MLflow (:mod:`workers.warm_process`); with none ready, the
job's own actor is created and its process started cold, as before. Either way
the worker's ``start``/``poll``/``stop``/``kill`` are the same, and so is the
post-start block in ``_start`` (right after the job process's pid is known).

The actor runs the job as a child process (``workers.job_runner``) so that the
job sees exactly the GPUs it was given (``CUDA_VISIBLE_DEVICES`` set from the
scheduler's decision, not Ray's GPU accounting), uses only its CPU threads, has
its output captured to a log file, and can be stopped for real: a terminated
process frees its memory, a Python thread would not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers import warm_process
from workers.cpu_control import CgroupV2, JobCpu, lower_share
from workers.interface.executor import (
    LaunchRequest,
    Progress,
    WarmPoolStatus,
    WorkerPhase,
    WorkerReport,
    combine_ranks,
)
from workers.memory_caps import job_verdict, register_job, release_job
from workers.pinning import pinned_env
from workers.ray_calls import gather
from workers.ray_pool import WarmPool
from workers.sim_backend import remove_usage, write_usage

log = logging.getLogger(__name__)

_ACTOR_PREFIX = "jobworker-train-"
_RANK_SEP = ".r"


def worker_key(job_id: str, rank: int) -> str:
    """The name suffix of a job's worker actor of ``rank`` (rank 0: the job id itself)."""
    return job_id if rank == 0 else f"{job_id}{_RANK_SEP}{rank}"


_LOG_CHUNK_BYTES = 1 << 20


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)  # type: ignore[call-overload]
class TrainingWorker:
    """Runs one job attempt; polled by the executor, stopped on request."""

    def __init__(
        self,
        launch: LaunchRequest | None,
        work_dir: str | None,
        warm_log: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        """One attempt's worker (``launch``, ``work_dir``) or, with ``warm_log``, a warm
        pool worker: it starts a warm job process now (MLflow readied for ``tracking_uri``)
        and is handed a job by :meth:`assign`."""
        self._launch = launch
        self._work_dir = Path(work_dir) if work_dir else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_timer: threading.Timer | None = None
        self._log_sent = 0
        self._start_lock = threading.Lock()
        self._cpu: JobCpu | None = None  # once it has a job: its cores, its CPU share
        self._unthrottle: threading.Timer | None = None
        self._warm: subprocess.Popen[bytes] | None = None
        self._warm_answered = threading.Event()  # the warm process said ready, or died
        self._warm_ok = False
        if warm_log is not None:
            log_path = Path(warm_log)
            warm = self._warm = warm_process.spawn(log_path, log_path.parent, tracking_uri)
            lower_share(warm.pid)  # its imports (and refills) never take CPU from serving
            threading.Thread(target=self._await_warm, args=(warm,), daemon=True).start()

    def _await_warm(self, warm: subprocess.Popen[bytes]) -> None:
        self._warm_ok = warm_process.wait_ready(warm)
        self._warm_answered.set()

    def wait_warm(self, timeout_s: float) -> int | None:
        """The warm process's pid once it waits for a job (None: not ready yet, or it died)."""
        warm = self._warm
        answered = warm is not None and self._warm_answered.wait(timeout_s)
        if warm is None or not answered or not self._warm_ok or warm.poll() is not None:
            return None
        return warm.pid

    def warm_info(self) -> dict[str, Any]:
        """Whether this pool worker is idle and ready, and its memory (RSS of the warm process
        and of this actor), for ``jobworker cluster``."""
        warm = self._warm
        rss_bytes = 0
        for pid in (os.getpid(), warm.pid if warm is not None else None):
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    rss_bytes += psutil.Process(pid).memory_info().rss
        idle = self._launch is None and warm is not None and warm.poll() is None
        return {"ready": idle and self._warm_ok, "rss_bytes": rss_bytes}

    def held(self) -> str | None:
        """The worker key of the job this worker runs (None: an idle pool worker)."""
        launch = self._launch
        return None if launch is None else worker_key(launch.job_id, launch.rank)

    def assign(self, launch: LaunchRequest, work_dir: str) -> int:
        """Run ``launch`` in this pool worker's warm process (cold if it died); its pid."""
        with self._start_lock:
            if self._launch is None:
                self._launch, self._work_dir = launch, Path(work_dir)
            elif self.held() != worker_key(launch.job_id, launch.rank):
                # Two control planes (a leader and its standby) may each count it idle.
                raise RuntimeError(f"this pool worker already runs {self.held()}")
        return self.start()

    def start(self) -> int:
        """Start the job process, once however often asked; returns its pid."""
        with self._start_lock:
            if self._proc is not None:
                return self._proc.pid
            return self._start()

    def _start(self) -> int:
        launch, work_dir = self._launch, self._work_dir
        assert launch is not None and work_dir is not None, "a pool worker starts by assign()"
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "launch.json").write_text(launch.model_dump_json())
        env = _job_env(launch)
        self._proc = self._hand_warm(work_dir, env) or self._start_cold(work_dir, env)
        if launch.simulated_usage_dir and launch.node.gpu_indices:
            write_usage(
                Path(launch.simulated_usage_dir),
                launch.job_id,
                self._proc.pid,
                list(launch.node.gpu_indices),
                launch.node.held_gpu_memory_bytes(launch.spec),
            )
        register_job(launch, self._proc.pid, work_dir)
        self._cpu = JobCpu(
            launch.node_dir,
            worker_key(launch.job_id, launch.rank),
            launch.spec.resources.cpus,
            launch.serving_cores,
            CgroupV2.find(),
        )
        self._cpu.place(self._proc.pid)  # its training cores, a lower CPU share
        return self._proc.pid

    def _hand_warm(self, work_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        """The warm process, handed the job; None when there is none or it died."""
        warm, self._warm = self._warm, None
        if warm is None:
            return None
        # A warm process still importing takes the job when it is ready: sooner than cold.
        self._warm_answered.wait()
        if self._warm_ok and warm_process.hand(warm, work_dir, env):
            return warm
        _signal_group(warm.pid, signal.SIGKILL)  # gone, or past saving
        warm.wait()
        return None

    def _start_cold(self, work_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(work_dir / "output.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.job_runner", str(work_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=work_dir,
            start_new_session=True,
        )
        log.close()
        return proc

    def poll(self, log_offset: int | None = None) -> dict[str, Any]:
        """State, progress, and log output from byte ``log_offset`` on.

        Without an offset (a restarted scheduler re-attaching), from where the
        previous poll's output ended, so that no log line is copied twice.
        """
        if log_offset is None:
            log_offset = self._log_sent
        work_dir = self._work_dir
        assert work_dir is not None, "an idle pool worker runs no job"
        proc = self._proc
        code = proc.poll() if proc else None
        logs = b""
        try:
            with open(work_dir / "output.log", "rb") as fh:
                fh.seek(log_offset)
                logs = fh.read(_LOG_CHUNK_BYTES)
        except FileNotFoundError:
            pass
        report: dict[str, Any] = {
            "pid": proc.pid if proc else None,
            "exit_code": code,
            "logs": logs.decode("utf-8", "replace"),
            "log_bytes": len(logs),
            "log_offset": log_offset,
            "progress": _read_json(work_dir / "progress.json"),
            "result": None,
        }
        self._log_sent = log_offset + len(logs)
        if code is not None:
            if self._stop_timer:
                self._stop_timer.cancel()
            report["result"] = _read_json(work_dir / "result.json")
            report["cap_verdict"] = job_verdict(work_dir)
            self._release_usage()
        return report

    def throttle(self, paused: bool, max_s: float) -> None:
        """Throttle the job process (the SLO guard), or release it; a throttle lasts at most
        ``max_s``, so that a control plane gone meanwhile never leaves it throttled. A job
        being stopped is never paused: it must see its SIGTERM."""
        proc, cpu = self._proc, self._cpu
        if proc is None or cpu is None or proc.poll() is not None:
            return
        if paused and self._stop_timer is not None:
            return
        if self._unthrottle is not None:
            self._unthrottle.cancel()
        cpu.pause(proc.pid, paused)
        if paused:
            self._unthrottle = threading.Timer(max_s, cpu.pause, (proc.pid, False))
            self._unthrottle.daemon = True
            self._unthrottle.start()

    def stop(self, grace_s: float) -> None:
        """SIGTERM now (the job checkpoints and stops), SIGKILL after ``grace_s``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._stop_timer = threading.Timer(grace_s, _signal_group, (proc.pid, signal.SIGKILL))
        self._stop_timer.daemon = True
        self.throttle(False, 0)  # a paused job would never see its SIGTERM
        _signal_group(proc.pid, signal.SIGTERM)
        self._stop_timer.start()

    def kill(self) -> None:
        """Kill the job process at once (the actor is going away)."""
        for proc in (self._proc, self._warm):
            if proc is not None and proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self._release_usage()

    def _release_usage(self) -> None:
        launch = self._launch
        if launch is None:
            return
        release_job(launch)
        if self._cpu is not None:
            self._cpu.release()
        if launch.simulated_usage_dir:
            remove_usage(Path(launch.simulated_usage_dir), launch.job_id)


def _job_env(launch: LaunchRequest) -> dict[str, str]:
    """What a job process's environment adds to the worker's: pinning, ranks, paths."""
    env = dict(
        pinned_env(launch.node.gpu_indices, launch.spec.resources.cpus),
        PYTHONUNBUFFERED="1",
        JOBWORKER_JOB_ID=launch.job_id,
        # The job runner waits out MLflow outages itself (workers.mlflow_context): the
        # client's own retries would only delay noticing one, and a stop request.
        MLFLOW_HTTP_REQUEST_MAX_RETRIES=os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        # Where Ray really put this actor: lets a job (and the tests) check the pinning.
        JOBWORKER_RAY_NODE_ID=ray.get_runtime_context().get_node_id(),
    )
    if launch.world_size > 1:  # a gang: torch.distributed's rendezvous (jobs/distributed.py)
        rank, world = str(launch.rank), str(launch.world_size)
        env.update(
            JOBWORKER_RANK=rank,
            JOBWORKER_WORLD_SIZE=world,
            RANK=rank,
            WORLD_SIZE=world,
            LOCAL_RANK="0",
            MASTER_ADDR=str(launch.master_addr),
            MASTER_PORT=str(launch.master_port),
        )
    if launch.python_path:
        env["PYTHONPATH"] = os.pathsep.join(
            [*launch.python_path, os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
    return env


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class RayExecutor:
    """Starts, polls and stops training worker actors.

    Example::

        executor = RayExecutor(namespace="jobworker", work_root=Path(".jobworker/work"))
        executor.launch(request)
        executor.poll([request.job_id])
    """

    def __init__(
        self,
        namespace: str,
        work_root: Path,
        poll_timeout_s: float = 10.0,
        throttle_max_s: float = 300.0,
        warm_pool: int = 0,
        refill_every_s: float = 1.0,
        tracking_uri: str | None = None,
    ) -> None:
        self._namespace = namespace
        self._throttle_max_s = throttle_max_s  # a node releases a throttle this late by itself
        self._work_root = work_root.resolve()
        self._poll_timeout_s = poll_timeout_s
        self._actors: dict[str, Any] = {}
        self._log_offsets: dict[str, int] = {}  # absent after a restart: the actor knows
        self._starts: dict[str, Any] = {}
        self._world: dict[str, int] = {}  # ranks per job launched by this process
        self._tracking_uri = tracking_uri  # the jobs' usual MLflow: warm processes ready it
        self._pool = WarmPool(namespace, warm_pool, self._make_pool_worker)
        self._closed = threading.Event()
        self._refiller: threading.Thread | None = None
        if warm_pool > 0:
            self._refiller = threading.Thread(
                target=self._refill, args=(refill_every_s,), name="warm-pool", daemon=True
            )
            self._refiller.start()

    def _make_pool_worker(self, name: str, node_id: str) -> Any:
        return TrainingWorker.options(  # type: ignore[attr-defined]
            name=name,
            namespace=self._namespace,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(None, None, str(self._work_root / ".pool" / f"{name}.log"), self._tracking_uri)

    def _refill(self, every_s: float) -> None:
        while not self._closed.wait(every_s):
            try:
                self._pool.refill()
            except Exception:  # Ray unreachable for a moment: the next round tries again
                log.exception("could not refill the warm pool")

    def warm_pool(self) -> list[WarmPoolStatus]:
        """Per node: the warm pool's size, its idle ready processes and their memory."""
        return self._pool.status()

    def close(self) -> None:
        """Stop refilling and kill the idle pool workers; running jobs keep running."""
        self._closed.set()
        if self._refiller is not None:
            self._refiller.join()
        self._pool.close()

    def launch(self, request: LaunchRequest) -> None:
        key = worker_key(request.job_id, request.rank)
        work_dir = self._work_root / request.job_id / f"attempt-{request.attempt}"
        if request.world_size > 1:
            work_dir = work_dir / f"rank-{request.rank}"
        self._world[request.job_id] = request.world_size
        if request.master_node_id is not None:
            address = self._node_address(request.master_node_id)
            request = request.model_copy(update={"master_addr": address})
        self._log_offsets[key] = 0
        warm = self._pool.take(request.node.node_id, key)
        if warm is not None:
            self._actors[key] = warm
            self._starts[key] = warm.assign.remote(request, str(work_dir))
            return
        actor = TrainingWorker.options(  # type: ignore[attr-defined]
            name=f"{_ACTOR_PREFIX}{key}",
            namespace=self._namespace,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(request.node.node_id, soft=False),
        ).remote(request, str(work_dir))
        self._actors[key] = actor
        self._starts[key] = actor.start.remote()

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        keys = {job_id: self._keys(job_id, (world_sizes or {}).get(job_id)) for job_id in job_ids}
        refs: dict[str, Any] = {}
        by_key: dict[str, WorkerReport] = {}
        for key in (k for ks in keys.values() for k in ks):
            actor = self._actor(key)
            if actor is None:
                by_key[key] = WorkerReport(key, WorkerPhase.LOST, error="no worker found")
            else:
                refs[key] = actor.poll.remote(self._log_offsets.get(key))
        for key, answer in gather(refs, self._poll_timeout_s).items():
            by_key[key] = self._report(key, answer)
        reports: dict[str, WorkerReport] = {}
        for job_id, ks in keys.items():
            ranks = [by_key[k] for k in ks]
            reports[job_id] = (
                combine_ranks(job_id, ranks)
                if len(ranks) > 1
                else dataclasses.replace(ranks[0], job_id=job_id)
            )
        return reports

    def _keys(self, job_id: str, world_size: int | None = None) -> list[str]:
        world = world_size or self._world.get(job_id) or 1
        return [worker_key(job_id, rank) for rank in range(world)]

    def _node_address(self, node_id: str) -> str:
        """The IP of a Ray node (``ray.nodes()``): a gang's rendezvous address."""
        for node in ray.nodes():  # type: ignore[no-untyped-call]
            if node["NodeID"] == node_id:
                return str(node["NodeManagerAddress"])
        raise RuntimeError(f"node {node_id} is not in the Ray cluster")

    def _report(self, job_id: str, answer: Any) -> WorkerReport:
        """A worker's poll ``answer`` (or the exception the call raised) as a report."""
        try:
            start = self._starts.get(job_id)
            if start is not None:
                # Never block the loop on an actor that is still starting.
                ready, _ = ray.wait([start], timeout=0)
                if not ready:
                    return WorkerReport(job_id, WorkerPhase.STARTING)
                ray.get(start)
                del self._starts[job_id]
            if isinstance(answer, BaseException):
                raise answer
            raw = answer
        except GetTimeoutError:
            return WorkerReport(job_id, WorkerPhase.STARTING)
        except RayActorError as exc:
            self._forget(job_id)
            return WorkerReport(job_id, WorkerPhase.LOST, error=f"worker lost: {exc}")
        except Exception as exc:  # the start call raised: the node could not start the process
            self._forget(job_id)
            return WorkerReport(job_id, WorkerPhase.LOST, error=f"could not start: {exc}")
        self._log_offsets[job_id] = raw["log_offset"] + raw["log_bytes"]
        progress = Progress.model_validate(raw["progress"]) if raw["progress"] else None
        result = raw["result"]
        common: dict[str, Any] = {
            "logs": raw["logs"],
            "progress": progress if progress and progress.step is not None else None,
            "pid": raw["pid"],
            "run_id": progress.run_id if progress else None,
        }
        if raw["pid"] is None:
            if job_id not in self._starts and (actor := self._actor(job_id)) is not None:
                # Placed by a control plane that died before its start call reached the
                # actor: start it now (start is idempotent).
                self._starts[job_id] = actor.start.remote()
            return WorkerReport(job_id, WorkerPhase.STARTING, **common)
        if raw["exit_code"] is None:
            return WorkerReport(job_id, WorkerPhase.RUNNING, **common)
        if raw.get("cap_verdict"):  # stopped by the node's watchdog: a retry would be too
            return WorkerReport(
                job_id, WorkerPhase.FAILED, error=raw["cap_verdict"], retryable=False, **common
            )
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
        """Ask every rank to stop, all at once; a rank that is gone has nothing to stop."""
        actors = {k: a for k in self._keys(job_id, self._discover(job_id)) if (a := self._actor(k))}
        refs = {key: actor.stop.remote(grace_s) for key, actor in actors.items()}
        for key, answer in gather(refs, self._poll_timeout_s).items():
            if isinstance(answer, Exception):
                log.warning("stop of %s failed: %s", key, answer)

    def throttle(self, job_id: str, paused: bool) -> None:
        """Throttle (or release) every rank at once; a rank that is gone is skipped."""
        actors = {k: a for k in self._keys(job_id, self._discover(job_id)) if (a := self._actor(k))}
        calls = {k: a.throttle.remote(paused, self._throttle_max_s) for k, a in actors.items()}
        for key, answer in gather(calls, self._poll_timeout_s).items():
            if isinstance(answer, Exception):
                log.warning("throttle of %s failed: %s", key, answer)

    def release(self, job_id: str) -> None:
        keys = self._keys(job_id, self._discover(job_id))
        actors = {k: a for k in keys if (a := self._actor(k))}
        # An actor that is already gone has nothing left to free: its answer is ignored.
        gather({key: actor.kill.remote() for key, actor in actors.items()}, self._poll_timeout_s)
        for key in keys:
            if key in actors:
                ray.kill(actors[key])
            self._forget(key)
        self._world.pop(job_id, None)

    def active(self) -> set[str]:
        return {key.split(_RANK_SEP)[0] for key in self._named()}

    def _named(self) -> list[str]:
        """Worker keys with a live worker: cold workers by name, pool workers by what they run."""
        names = ray.util.list_named_actors(all_namespaces=True)
        cold = [
            n["name"].removeprefix(_ACTOR_PREFIX)
            for n in names
            if n["namespace"] == self._namespace and n["name"].startswith(_ACTOR_PREFIX)
        ]
        return [*cold, *sorted(self._pool.held_keys())]

    def _discover(self, job_id: str) -> int | None:
        """How many ranks a job has, when this process did not launch it (after a restart)."""
        if job_id in self._world:
            return self._world[job_id]
        return sum(1 for key in self._named() if key.split(_RANK_SEP)[0] == job_id) or None

    def _actor(self, job_id: str) -> Any | None:
        actor = self._actors.get(job_id) or self._pool.holder(job_id)
        if actor is None:
            try:
                actor = ray.get_actor(f"{_ACTOR_PREFIX}{job_id}", namespace=self._namespace)
            except ValueError:
                return None
            self._actors[job_id] = actor
        return actor

    def _forget(self, job_id: str) -> None:
        self._actors.pop(job_id, None)
        self._pool.forget(job_id)
        self._starts.pop(job_id, None)
        self._log_offsets.pop(job_id, None)
