"""Chaos: jobs keep their promise while the control plane, workers and MLflow are killed.

Run from the repository root::

    .venv/bin/python bench/chaos.py [--jobs 200] [--cp-kills 10] [--worker-kills 10]
                                    [--mlflow-restarts 2] [--db-url URL | --postgres]
                                    [--seed 0]

Two control planes on one store (``--db-url``; default a SQLite file; a
``postgresql+psycopg://`` URL for PostgreSQL) and one Ray: ``a`` is the embedded
set-up (``jobworker up`` starts local Ray and the MLflow server as daemons),
``b`` a hot standby joined to them. ``--postgres`` starts a throw-away
PostgreSQL 15 for the store (``tests/postgres.py``). One simulated node of four 40 GB GPUs.

The workload: ``--jobs`` short jobs (``bench/chaos_job.py``: count steps,
checkpoint, resume) of 1, 2 or 4 GPUs at mixed priorities, 5 % of them made to
fail by their own code; and a deployment of a model trained first that needs
most of a GPU, deployed a third of the way in (it preempts a job) and removed
a minute later. Chaos, at random moments (the points where so many
jobs have ended, drawn with ``--seed``): the leading control plane SIGKILLed
``--cp-kills`` times (then started again, as the new standby), the Ray worker
process of a running job SIGKILLed ``--worker-kills`` times, the MLflow server
stopped and started again ``--mlflow-restarts`` times.

At the end, checked from the store and MLflow: every job ended exactly once
(one terminal event), SUCCEEDED unless its own code failed, one MLflow run per
job, every step's metric logged once; then ``jobworker down`` on both homes and
no process of either left. ``failover_s``: a leader's SIGKILL until the standby
leads (``GET /healthz`` says ``leader``), median of the kills (max beside it).

The last line is::

    RESULT chaos jobs=200 lost=0 duplicated=0 failed_not_own_fault=0 metrics_missing=0
        metrics_duplicated=0 orphans=0 failover_s=… failover_max_s=… wall_s=… store=sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from scheduler.cli import daemons  # noqa: E402

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
CLUSTER = """nodes:
  - name: local
    cpus: 4
    memory_gb: 16
    gpus:
      - {type: A100, memory_gb: 40, count: 4}
"""
SEED_JOB = """name: chaos-seed
experiment: chaos
model: {name: mlp, options: {hidden: [32]}}
data: {name: synthetic_classification, options: {n_samples: 256}}
train: {max_steps: 20, batch_size: 32, checkpoint_every_steps: 10}
resources: {gpus: 1, gpu_memory_gb: 2, cpus: 1, memory_gb: 1}
register_as: chaos-model
register_alias: champion
"""
DEPLOYMENT = """name: chaos-model
model: models:/chaos-model@champion
replicas: {min: 1, max: 1}
resources: {gpu_memory_gb: 36, cpus: 1}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(check: Callable[[], Any], what: str, timeout_s: float, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise SystemExit(f"chaos: {what}: not within {timeout_s:.0f} s")


def job_text(i: int, rng: random.Random, steps: int) -> tuple[str, bool]:
    gpus = rng.choices([1, 2, 4], weights=[70, 25, 5])[0]
    fails = rng.random() < 0.05
    config: dict[str, Any] = {"steps": steps, "step_s": 0.05, "checkpoint_every": 5}
    if fails:
        config["fail_at"] = rng.randint(2, steps)
    text = (
        f"name: chaos-{i}\nexperiment: chaos\nentrypoint: bench.chaos_job:count\n"
        f"config: {json.dumps(config)}\ntrain: {{max_steps: 1}}\n"
        f"priority: {rng.choice([0, 0, 0, 5])}\n"
        f"resources: {{gpus: {gpus}, gpu_memory_gb: 8, cpus: 1, memory_gb: 1}}\n"
    )
    return text, fails


class Plane:
    """One `jobworker up` of the pair: its home, flags, and HTTP client."""

    def __init__(self, name: str, home: Path, port: int, flags: list[str], env: dict[str, str]):
        self.name, self.home, self.port, self.flags, self.env = name, home, port, flags, env
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        self.pids: set[int] = set()

    def up(self) -> None:
        cmd = [sys.executable, "-m", "scheduler.cli", "up", "--detach", "--home", str(self.home)]
        started = subprocess.run(
            [*cmd, "--port", str(self.port), *self.flags],
            cwd=REPO,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if started.returncode != 0:
            raise SystemExit(f"chaos: up {self.name} failed:\n{started.stdout}{started.stderr}")
        self.pids.add(self.api_pid())
        token = (self.home / "admin.token").read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def api_pid(self) -> int:
        return int(json.loads((self.home / "api.json").read_text())["pid"])

    def role(self) -> str | None:
        try:
            return str(self.http.get("/healthz").json()["role"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cp-kills", type=int, default=10)
    parser.add_argument("--worker-kills", type=int, default=10)
    parser.add_argument("--mlflow-restarts", type=int, default=2)
    parser.add_argument("--db-url", help="the shared store (default: a SQLite file)")
    parser.add_argument(
        "--postgres", action="store_true", help="the store on a throw-away PostgreSQL server"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="jw-chaos-"))
    homes = [root / "a", root / "b"]
    for home in homes:
        home.mkdir()
    (root / "cluster.yaml").write_text(CLUSTER)
    postgres = None
    if args.postgres:
        from tests.postgres import PostgresServer, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit("chaos: --postgres needs PostgreSQL's initdb and postgres")
        postgres = PostgresServer.start(bin_dir)
        wait(postgres.ready, "PostgreSQL to accept connections", 60)
        args.db_url = postgres.create_database()
    db_url = args.db_url or f"sqlite:///{root / 'jobs.db'}"
    store = "postgres" if db_url.startswith("postgresql") else "sqlite"
    mlflow_port = free_port()
    common = ["--db-url", db_url, "--cluster-config", str(root / "cluster.yaml")]
    common += ["--gpu-backend", "simulated"]
    a = Plane("a", homes[0], free_port(), [*common, "--mlflow-port", str(mlflow_port)], {})
    started = time.monotonic()
    print(f"chaos: {args.jobs} jobs, store {store}, state in {root}", flush=True)
    a.up()
    ray = daemons.record(a.home, daemons.RAY)
    mlflow = daemons.record(a.home, daemons.MLFLOW)
    assert ray is not None and mlflow is not None
    b_flags = [*common, "--ray-address", ray.address, "--tracking-uri", mlflow.address]
    login = daemons.mlflow_credentials(a.home)  # a's MLflow server: b logs in as a does
    b = Plane("b", homes[1], free_port(), b_flags, {**daemons.ray_auth(a.home), **login})
    b.up()
    planes = [a, b]
    wait(lambda: sorted(p.role() or "" for p in planes) == ["leader", "standby"], "roles", 60)

    def leader() -> Plane:
        return wait(lambda: next((p for p in planes if p.role() == "leader"), None), "lead", 60)

    def submit(text: str) -> str:
        for _ in range(100):  # the plane asked may be the one just killed: ask the other
            for plane in planes:
                try:
                    r = plane.http.post(
                        "/jobs", content=text, headers={"content-type": "application/yaml"}
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 201:
                    return str(r.json()["id"])
                raise SystemExit(f"chaos: submit refused ({r.status_code}): {r.text}")
            time.sleep(0.2)
        raise SystemExit("chaos: no control plane accepts submits")

    def jobs() -> dict[str, dict[str, Any]]:
        for _ in range(100):
            for plane in planes:
                try:
                    return {j["id"]: j for j in plane.http.get("/jobs?limit=10000").json()}
                except (httpx.HTTPError, ValueError):
                    continue
            time.sleep(0.2)
        raise SystemExit("chaos: no control plane answers")

    seed = submit(SEED_JOB)
    wait(lambda: jobs()[seed]["state"] in TERMINAL, "the seed job", 600, 1.0)
    if jobs()[seed]["state"] != "SUCCEEDED":
        raise SystemExit(f"chaos: the seed job failed: {jobs()[seed]['error']}")

    texts = [job_text(i, rng, args.steps) for i in range(args.jobs)]
    ids = {submit(text): fails for text, fails in texts}
    events = (
        ["cp"] * args.cp_kills + ["worker"] * args.worker_kills + ["mlflow"] * args.mlflow_restarts
    )
    rng.shuffle(events)
    at = sorted(rng.sample(range(1, max(args.jobs - 1, len(events) + 2)), len(events)))
    plan = list(zip(at, events, strict=True))
    plan += [(args.jobs // 3, "deploy")]
    plan.sort()
    undeploy_at: list[float] = []  # the replica stays a minute: by time, as a job that
    # cannot fit beside it (4 GPUs) would otherwise wait for it forever
    failovers: list[float] = []

    def kill_leader() -> None:
        lead = leader()
        standby = next(p for p in planes if p is not lead)
        os.kill(lead.api_pid(), signal.SIGKILL)
        killed = time.monotonic()
        wait(lambda: standby.role() == "leader", "the standby to lead", 120, 0.05)
        failovers.append(time.monotonic() - killed)
        lead.up()  # back, as the standby

    def kill_worker() -> None:
        running = [j for j in jobs().values() if j["state"] == "RUNNING" and j["assignment"]]
        pids = [n["pid"] for j in running for n in j["assignment"]["nodes"] if n["pid"]]
        if not pids:
            return
        try:
            worker = psutil.Process(rng.choice(pids)).parent()
            if worker is not None:
                worker.kill()  # the Ray worker hosting the job's actor
        except psutil.Error:
            pass

    def restart_mlflow() -> None:
        daemons.stop(a.home, daemons.MLFLOW)
        daemons.mlflow_server(a.home, mlflow_port)

    def deploy() -> None:
        leader().http.post(
            "/deployments", content=DEPLOYMENT, headers={"content-type": "application/yaml"}
        )
        undeploy_at.append(time.monotonic() + 60)

    actions: dict[str, Callable[[], None]] = {
        "cp": kill_leader,
        "worker": kill_worker,
        "mlflow": restart_mlflow,
        "deploy": deploy,
    }
    deadline = time.monotonic() + args.timeout_s
    while True:
        now_jobs = jobs()
        ended = sum(1 for i in ids if now_jobs.get(i, {}).get("state") in TERMINAL)
        while plan and plan[0][0] <= ended:
            _, event = plan.pop(0)
            print(f"chaos: {ended}/{args.jobs} ended: {event}", flush=True)
            actions[event]()
        if undeploy_at and time.monotonic() > undeploy_at[0]:
            undeploy_at.clear()
            print(f"chaos: {ended}/{args.jobs} ended: undeploy", flush=True)
            leader().http.delete("/deployments/chaos-model")
        if ended == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(1.0)

    final = jobs()
    os.environ.update(login)  # MLflow's client reads its login from the environment
    client = MlflowClient(mlflow.address)
    experiment = client.get_experiment_by_name("chaos")
    lost = duplicated = failed_not_own = missing = dup_steps = 0
    for job_id, fails in ids.items():
        job = final.get(job_id)
        if job is None or job["state"] not in TERMINAL:
            lost += 1
            continue
        detail = None
        for plane in planes:
            try:
                detail = plane.http.get(f"/jobs/{job_id}").json()
                break
            except httpx.HTTPError:
                continue
        history = (detail or {}).get("history") or []
        ends = sum(1 for e in history if e["to_state"] in TERMINAL)
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`jobworker.job_id` = '{job_id}'"
        )
        if ends != 1 or len(runs) != 1:
            duplicated += 1
        if job["state"] != "SUCCEEDED" and not fails:
            failed_not_own += 1
            print(f"chaos: {job_id} {job['state']}: {job['error']}", flush=True)
        if job["state"] == "SUCCEEDED" and runs:
            steps = [int(m.step) for m in client.get_metric_history(runs[0].info.run_id, "counted")]
            missing += len(set(range(1, args.steps + 1)) - set(steps))
            dup_steps += len(steps) - len(set(steps))
    wall_s = time.monotonic() - started
    recorded = {
        d.pid for h in homes for n in ("api", "ray", "mlflow") if (d := daemons.record(h, n))
    }
    for plane in (b, a):  # the standby's home first: a's stops Ray and MLflow
        subprocess.run(
            [sys.executable, "-m", "scheduler.cli", "down", "--home", str(plane.home)],
            cwd=REPO,
            capture_output=True,
            timeout=300,
        )
    pids = recorded | a.pids | b.pids
    marks = (str(root), str(daemons.ray_temp_dir(a.home)))

    def left() -> list[int]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                group = os.getpgid(proc.info["pid"])
            except ProcessLookupError:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:  # exited (a child of ours, unreaped)
                    continue
            except psutil.Error:
                continue
            if {proc.info["pid"], group} & pids or any(m in cmdline for m in marks):
                found.append(proc.info["pid"])
        return found

    deadline = time.monotonic() + 60
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    orphans = len(left())
    if postgres is not None:
        postgres.stop()
    median = statistics.median(failovers) if failovers else float("nan")
    worst = max(failovers) if failovers else float("nan")
    print(
        f"RESULT chaos jobs={len(ids)} lost={lost} duplicated={duplicated} "
        f"failed_not_own_fault={failed_not_own} metrics_missing={missing} "
        f"metrics_duplicated={dup_steps} orphans={orphans} failover_s={median:.2f} "
        f"failover_max_s={worst:.2f} wall_s={wall_s:.0f} store={store}",
        flush=True,
    )


if __name__ == "__main__":
    main()
