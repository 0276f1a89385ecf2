"""Benchmark dispatch latency: ``POST /jobs`` → the job's first training step.

Run from anywhere (it changes to the repository root)::

    .venv/bin/python bench/dispatch.py [--jobs 20] [--warmup 2] [--warm-pool 1] [--skip-probe]

The same training script (``bench/dispatch_train.py``: the zoo's mlp, five
steps) goes through two paths on one warm local Ray cluster, in the same run:

- **jobworker**: a control plane built by ``scheduler.wiring.build`` and
  connected to that cluster, its API served by uvicorn on a free 127.0.0.1
  port; each job is a real HTTP ``POST /jobs`` of a JSON config with
  ``entrypoint: bench.dispatch_train:main``, ``resources: {gpus: 0, cpus: 1}``.
  The plane keeps ``--warm-pool`` warm job processes per node (0: every job
  starts cold); before each jobworker job the benchmark waits until ``GET
  /cluster`` shows every node's pool full again, so each measured job finds
  a warm process as a job submitted to a quiet cluster would (the pool refills
  in the background after a job takes its process, and its imports would
  otherwise compete with the next job for the two CPUs).
- **rayjobs**: Ray's own Jobs API (``JobSubmissionClient.submit_job``) running
  ``python bench/dispatch_train.py --out … --tag …`` with only ``PYTHONPATH``
  in its runtime env (no working-dir upload).

Latency is ``first_step_at - t_post``: ``t_post`` is read right before the
HTTP POST / ``submit_job`` call, ``first_step_at`` is written by the script
after its first optimizer step (same machine, same clock). Each path gets
``--warmup`` unmeasured jobs, then ``--jobs`` measured ones, alternating
between the paths with one job in flight at a time (submit, wait until it
ends, next), so neither path competes with the other for the two CPUs and
slow drift on the machine hits both alike.

It also prints the median of each phase, from marks both paths leave (API
response, state history, the job process's start tick, the MLflow run's
start time, entry into the training function), and, unless ``--skip-probe``,
what a fresh Python process pays to import what each process imports.

Cleanup: the head runs with its own ``--temp-dir`` (``/tmp/ray_bench_<pid>``);
at the end every process whose command line names that directory or the
head's GCS port is terminated, then killed. Never ``ray stop``: it would stop
every Ray instance on the machine (other people's tests too).

The last line is::

    RESULT dispatch jobworker_p50_ms=… jobworker_p95_ms=… rayjobs_p50_ms=… rayjobs_p95_ms=… \
        ratio=… warm_pool=…

(one line, broken here to fit) with ``ratio = jobworker_p50 / rayjobs_p50`` and
``warm_pool`` the pool size per node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from scheduler.auth.identity import Role  # noqa: E402
from scheduler.wiring import ControlPlane, Settings, build  # noqa: E402

TRAIN_SCRIPT = REPO_ROOT / "bench" / "dispatch_train.py"
EXPERIMENT = "dispatch-bench"
JOB_TIMEOUT_S = 180.0
POLL_S = 0.2
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


# -- the local Ray head ---------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on every interface right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RayHead:
    """A ``ray start --head`` cluster owned by this benchmark, found by its temp dir."""

    temp_dir: Path
    address: str = ""
    dashboard_url: str = ""
    gcs_port: int | None = None

    def start(self, num_cpus: int) -> None:
        """``ray start --head`` with every listening port chosen free, the dashboard on."""
        gcs_port, dash_port = free_port(), free_port()
        ports = {
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={200 * 2**20}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        # Ray 2.5x+ turns token auth on for `ray start`; this private throwaway cluster opts out,
        # as the drivers that join it (ray.init in wiring, the Jobs client) send no token.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")
        self.gcs_port = gcs_port
        # Ray rewrites 127.0.0.1 to the node's IP, where the GCS listens.
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dash_port}"

    def processes(self) -> list[psutil.Process]:
        """Every live process whose command line names this head's temp dir or GCS port.

        The temp dir finds GCS, raylet, dashboard, agents and workers; the
        Ray client proxy names only the GCS address.
        """
        temp_dir = str(self.temp_dir)
        gcs = re.compile(rf":{self.gcs_port}(?!\d)") if self.gcs_port else None
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if proc.pid != os.getpid() and any(
                temp_dir in arg or (gcs is not None and gcs.search(arg)) for arg in cmdline
            ):
                found.append(proc)
        return found

    def stop(self) -> None:
        """Terminate this head's processes (SIGKILL after 10 s) and remove its temp dir."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def jobs_client(url: str, timeout_s: float = 60.0) -> JobSubmissionClient:
    """A Jobs API client, once the dashboard answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return JobSubmissionClient(url)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -- jobworker's API over HTTP -------------------------------------------------------------
class ApiServer:
    """The FastAPI app served by uvicorn in a daemon thread, on 127.0.0.1."""

    def __init__(self, app: FastAPI, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve in the background; returns once uvicorn is listening."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10)


# -- samples --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One measured job: named wall-clock marks (``time.time()``) on its way to the first step.

    Every sample has ``post`` (right before the POST / ``submit_job``), ``accepted``
    (the call returned), ``entered`` (the training function was entered) and
    ``first_step``; ``process`` (the job process was created), ``SCHEDULED`` and
    ``run_created`` (the MLflow run's start time) where known.
    """

    tag: str
    marks: dict[str, float]

    @property
    def latency_ms(self) -> float:
        """The measured figure: first step minus ``post``."""
        return (self.marks["first_step"] - self.marks["post"]) * 1000


def first_steps(path: Path) -> dict[str, dict[str, Any]]:
    """The script's records in ``path``, by tag."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    return {rec["tag"]: rec for rec in (json.loads(line) for line in lines if line.strip())}


def _sample(out: Path, tag: str, marks: dict[str, float]) -> Sample:
    """The sample of job ``tag``: the caller's marks plus the script's record in ``out``."""
    rec = first_steps(out).get(tag)
    if rec is None:
        raise RuntimeError(f"job {tag} finished without recording its first step in {out}")
    marks = {**marks, "first_step": rec["first_step_at"], "entered": rec["entered_at"]}
    if rec.get("proc_started_at") is not None:
        marks["process"] = rec["proc_started_at"]
    return Sample(tag, marks)


def run_jobworker(http: httpx.Client, tracking: MlflowClient, out: Path, tag: str) -> Sample:
    """POST one job, wait for its end, and collect its marks."""
    body = {
        "name": f"dispatch-{tag}",
        "experiment": EXPERIMENT,
        "entrypoint": "bench.dispatch_train:main",
        "config": {"out": str(out), "tag": tag},
        "train": {"max_steps": 5},
        "resources": {"gpus": 0, "cpus": 1},
    }
    payload = json.dumps(body)
    t_post = time.time()
    resp = http.post("/jobs", content=payload, headers={"content-type": "application/json"})
    t_accepted = time.time()
    if resp.status_code != 201:
        raise RuntimeError(f"POST /jobs answered {resp.status_code}: {resp.text}")
    job_id = resp.json()["id"]
    job = _wait(lambda: http.get(f"/jobs/{job_id}").json(), lambda j: j["state"] in TERMINAL)
    if job["state"] != "SUCCEEDED":
        logs = http.get(f"/jobs/{job_id}/logs").json()["text"]
        raise RuntimeError(f"jobworker job {tag} ended {job['state']}: {job['error']}\n{logs}")
    marks = {e["to_state"]: e["at"] for e in job["history"] or []}
    marks.update(post=t_post, accepted=t_accepted)
    if job["run_id"]:
        marks["run_created"] = tracking.get_run(job["run_id"]).info.start_time / 1000
    return _sample(out, tag, marks)


def wait_for_pool(http: httpx.Client, size: int) -> None:
    """Until ``GET /cluster`` shows ``size`` idle warm processes on every node (none: no wait)."""
    if size == 0:
        return

    def full(cluster: dict[str, Any]) -> bool:
        pools = [node.get("pool") or {} for node in cluster["nodes"]]
        return bool(pools) and all(p.get("idle", 0) >= size for p in pools)

    _wait(lambda: http.get("/cluster").json(), full)


def run_rayjobs(client: JobSubmissionClient, out: Path, tag: str) -> Sample:
    """Submit one Ray job running the same script, wait for its end, and collect its marks."""
    entrypoint = f"{sys.executable} {TRAIN_SCRIPT} --out {out} --tag {tag}"
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    t_post = time.time()
    submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    t_accepted = time.time()
    status = _wait(lambda: client.get_job_status(submission_id), JobStatus.is_terminal)
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(submission_id)
        raise RuntimeError(f"Ray job {tag} ended {status}:\n{logs}")
    return _sample(out, tag, {"post": t_post, "accepted": t_accepted})


def _wait(get: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
    """Poll ``get()`` every ``POLL_S`` until ``done`` holds; ``TimeoutError`` after a while."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        value = get()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"job not finished after {JOB_TIMEOUT_S:.0f} s: {value}")
        time.sleep(POLL_S)


# -- statistics and report ------------------------------------------------------------------
def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    data = sorted(values)
    pos = (len(data) - 1) * pct / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(samples: Sequence[Sample]) -> dict[str, float]:
    """p50, p95, mean, min and max of the latencies, in ms."""
    ms = [s.latency_ms for s in samples]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "mean": statistics.fmean(ms),
        "min": min(ms),
        "max": max(ms),
    }


def _phase_ms(samples: Sequence[Sample], start: str, end: str) -> str:
    """The median of mark ``end`` minus mark ``start`` over the samples having both, in ms."""
    gaps = [
        (s.marks[end] - s.marks[start]) * 1000 for s in samples if {start, end} <= s.marks.keys()
    ]
    return f"{statistics.median(gaps):8.0f}" if gaps else "       -"


# (label, start mark, end mark) of each phase, in order: they add up to the latency.
PHASES = {
    "jobworker": [
        ("POST -> 201 (validate, store)", "post", "accepted"),
        ("201 -> SCHEDULED (loop wakes, places)", "accepted", "SCHEDULED"),
        ("SCHEDULED -> entrypoint called (hand-off, runner)", "SCHEDULED", "entered"),
        ("entrypoint -> first step", "entered", "first_step"),
    ],
    "rayjobs": [
        ("submit_job -> returned", "post", "accepted"),
        ("returned -> job process (supervisor, Popen)", "accepted", "process"),
        ("job process -> script entered (imports)", "process", "entered"),
        ("script entered -> first step", "entered", "first_step"),
    ],
}


def print_report(results: Mapping[str, Sequence[Sample]], warmup: int) -> dict[str, float]:
    """The latency table and the per-phase breakdown; returns the RESULT figures."""
    n = min(len(v) for v in results.values())
    print(
        f"\ndispatch latency, POST/submit -> first optimizer step "
        f"({n} jobs per path after {warmup} warm-up, one in flight at a time, warm Ray)"
    )
    print(
        f"{'path':<10} {'n':>3} {'p50_ms':>8} {'p95_ms':>8} {'mean_ms':>8} "
        f"{'min_ms':>8} {'max_ms':>8}"
    )
    stats = {name: summary(samples) for name, samples in results.items()}
    for name, st in stats.items():
        print(
            f"{name:<10} {len(results[name]):>3} {st['p50']:8.0f} {st['p95']:8.0f} "
            f"{st['mean']:8.0f} {st['min']:8.0f} {st['max']:8.0f}"
        )
    ratio = stats["jobworker"]["p50"] / stats["rayjobs"]["p50"]
    print(f"ratio jobworker_p50 / rayjobs_p50 = {ratio:.2f}")

    for name, phases in PHASES.items():
        print(f"\nwhere the time goes, {name} (median ms per phase)")
        for label, start, end in phases:
            print(f"  {label:<44} {_phase_ms(results[name], start, end)}")
    jobworker = results["jobworker"]
    print("\noff the path, jobworker (median ms; negative: before the mark)")
    for label, end in (("job process created", "process"), ("MLflow run created", "run_created")):
        print(f"  {label + ', from SCHEDULED':<44} {_phase_ms(jobworker, 'SCHEDULED', end)}")
    return {
        "jobworker_p50_ms": stats["jobworker"]["p50"],
        "jobworker_p95_ms": stats["jobworker"]["p95"],
        "rayjobs_p50_ms": stats["rayjobs"]["p50"],
        "rayjobs_p95_ms": stats["rayjobs"]["p95"],
        "ratio": ratio,
    }


IMPORT_PROBES = {
    "python -c pass": "pass",
    "import ray": "import ray",
    "import workers.ray_executor (actor)": "import workers.ray_executor",
    "import torch": "import torch",
    "import torch + first torch.optim.SGD(...)": (
        "import torch; torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)"
    ),
    "import mlflow": "import mlflow",
    "import workers.job_runner (job process)": "import workers.job_runner",
}


def import_probe(reps: int = 3) -> None:
    """Median wall time of a fresh Python process doing each probe (cwd: repo root)."""
    print(f"\nfresh-process cost (median of {reps}, ms)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for label, code in IMPORT_PROBES.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"  {label:<44} {statistics.median(times):8.0f}")


# -- main -----------------------------------------------------------------------------------
@contextlib.contextmanager
def bench_cluster(
    home: Path, warm_pool: int
) -> Iterator[tuple[ControlPlane, ApiServer, JobSubmissionClient]]:
    """Ray head, jobworker plane on it, API over HTTP, Jobs API client; all torn down after."""
    head = RayHead(Path(f"/tmp/ray_bench_{os.getpid()}"))
    plane: ControlPlane | None = None
    server: ApiServer | None = None
    try:
        t0 = time.monotonic()
        head.start(num_cpus=os.cpu_count() or 2)
        print(
            f"ray head at {head.address}, dashboard {head.dashboard_url} "
            f"({time.monotonic() - t0:.1f} s)",
            flush=True,
        )
        settings = Settings(
            home=home,
            tracking_uri=f"sqlite:///{home}/mlflow.db",
            ray_address=head.address,
            gpu_backend="simulated",
            loop_interval_s=0.5,
            warm_pool=warm_pool,
        )
        plane = build(settings)
        plane.start()
        server = ApiServer(plane.app, free_port())
        server.start()
        print(f"jobworker API at {server.url}", flush=True)
        yield plane, server, jobs_client(head.dashboard_url)
    finally:
        if server is not None:
            server.stop()
        if plane is not None:
            plane.stop()
        if ray.is_initialized():
            ray.shutdown()
        head.stop()
        left = head.processes()
        print(f"cleanup: ray head stopped ({len(left)} of its processes left)", flush=True)


def admin_headers(plane: ControlPlane) -> dict[str, str]:
    """A new admin token of the plane's store, as a request header."""
    _, token = plane.tokens.create("default", Role.ADMIN, name="bench dispatch")
    return {"Authorization": f"Bearer {token}"}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table, the breakdown and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="measured jobs per path")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured jobs per path")
    parser.add_argument("--skip-probe", action="store_true", help="skip the import probe")
    parser.add_argument(
        "--warm-pool", type=int, default=1, help="warm job processes per node (0: cold starts)"
    )
    args = parser.parse_args(argv)
    # The plane puts its working directory on the job processes' PYTHONPATH.
    os.chdir(REPO_ROOT)
    results: dict[str, list[Sample]] = {"jobworker": [], "rayjobs": []}
    with tempfile.TemporaryDirectory(prefix="jobworker-dispatch-") as tmp:
        home = Path(tmp)
        jw_out, ray_out = home / "jobworker.jsonl", home / "rayjobs.jsonl"
        with (
            bench_cluster(home, args.warm_pool) as (_plane, server, ray_jobs),
            httpx.Client(base_url=server.url, timeout=60, headers=admin_headers(_plane)) as http,
        ):
            tracking = MlflowClient(f"sqlite:///{home}/mlflow.db")
            for i in range(args.warmup + args.jobs):
                measured = i >= args.warmup
                prefix = "" if measured else "warm-"
                wait_for_pool(http, args.warm_pool)
                jw = run_jobworker(http, tracking, jw_out, f"{prefix}jw-{i}")
                rj = run_rayjobs(ray_jobs, ray_out, f"{prefix}ray-{i}")
                if measured:
                    results["jobworker"].append(jw)
                    results["rayjobs"].append(rj)
                print(
                    f"{'job' if measured else 'warm-up'} {i:>2}: "
                    f"jobworker {jw.latency_ms:6.0f} ms   rayjobs {rj.latency_ms:6.0f} ms",
                    flush=True,
                )
    figures = print_report(results, args.warmup)
    if not args.skip_probe:
        import_probe()
    print(
        "RESULT dispatch "
        + " ".join(f"{k}={v:.2f}" if k == "ratio" else f"{k}={v:.0f}" for k, v in figures.items())
        + f" warm_pool={args.warm_pool}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
