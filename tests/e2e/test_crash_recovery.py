"""The scheduler process SIGKILLed mid-run, then restarted: every job ends exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, admin_headers, wait_until
from tests.integration.conftest import entrypoint_yaml, free_port

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def _up(home: Path, port: int, address: str, shared: Path | None = None) -> subprocess.Popen[bytes]:
    """`jobworker up` on ``home``; with ``shared``, its store and MLflow live there."""
    log = (home / f"up-{time.monotonic_ns()}.log").open("wb")
    state = shared or home
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.cli",
            "up",
            "--home",
            str(home),
            "--port",
            str(port),
            "--db-url",
            f"sqlite:///{state / 'jobs.db'}",
            "--tracking-uri",
            f"sqlite:///{state / 'mlflow.db'}",
            "--ray-address",
            address,
            "--cluster-config",
            str(REPO / "configs" / "cluster" / "local_sim.yaml"),
            "--gpu-backend",
            "simulated",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_up(http: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    def answers() -> bool:
        assert proc.poll() is None, "jobworker up exited"
        try:
            return http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, "jobworker up answers /healthz", 120, every_s=0.3)


def _jobs(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in http.get("/jobs").json()}


def test_sigkill_mid_run_then_restart_leaves_every_job_terminal_once(
    ray_session: None, tmp_path: Path
) -> None:
    address = ray.get_runtime_context().gcs_address
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    first = _up(home, port, address)
    second: subprocess.Popen[bytes] | None = None
    try:
        _wait_up(http, first)
        http.headers.update(admin_headers(home))
        steps = 50
        ids = []
        for i in range(3):  # two GPUs: two run, one waits in the queue
            text = entrypoint_yaml(
                f"crash{i}", "count_steps", gpus=1, gpu_memory_gb=30, steps=steps, step_s=0.3
            )
            r = http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

        def two_running() -> list[dict[str, Any]] | None:
            running = [
                j for j in _jobs(http).values()
                if j["state"] == "RUNNING" and ((j["progress"] or {}).get("step") or 0) >= 8
            ]  # fmt: skip
            return running if len(running) == 2 else None

        running = wait_until(two_running, "two jobs running past step 8", 120, every_s=0.3)
        jobs = _jobs(http)
        queued = [i for i in ids if jobs[i]["state"] == "PENDING"]
        assert len(queued) == 1

        os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up
        first.wait(timeout=30)
        second = _up(home, port, address)
        _wait_up(http, second)

        wait_until(
            lambda: all(j["state"] in TERMINAL for j in _jobs(http).values()),
            "every job ends",
            240,
            every_s=0.5,
        )
        jobs = _jobs(http)
        assert all(jobs[i]["state"] == "SUCCEEDED" for i in ids), jobs
        mlflow = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        for job_id in ids:
            history = http.get(f"/jobs/{job_id}").json()["history"]
            ends = [e for e in history if e["to_state"] in TERMINAL]
            assert len(ends) == 1, history
            runs = mlflow.search_runs(
                [mlflow.get_experiment_by_name("it").experiment_id],
                filter_string=f"tags.`jobworker.job_id` = '{job_id}'",
            )
            assert len(runs) == 1, f"{job_id} has {len(runs)} MLflow runs"
            counted = sorted(
                int(m.step) for m in mlflow.get_metric_history(runs[0].info.run_id, "counted")
            )
            assert counted[-1] == steps and len(counted) - steps <= 5
        for job in running:  # re-attached, not run again
            assert _jobs(http)[job["id"]]["attempts"] == 1
        logs = http.get(f"/jobs/{running[0]['id']}/logs").json()["text"]
        assert logs.count("count_steps: starting at step 1") == 1  # no line copied twice
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def test_a_standby_takes_over_when_the_leader_dies_and_every_job_ends_once(
    ray_session: None, tmp_path: Path
) -> None:
    address = ray.get_runtime_context().gcs_address
    shared = tmp_path / "shared"
    homes = [tmp_path / "a", tmp_path / "b"]
    for path in (shared, *homes):
        path.mkdir()
    ports = [free_port(), free_port()]
    https = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=30) for p in ports]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # One after the other: the first creates MLflow's tables in the shared SQLite file.
        for home, port, http in zip(homes, ports, https, strict=True):
            procs.append(_up(home, port, address, shared))
            _wait_up(http, procs[-1])
            http.headers.update(admin_headers(home))  # each home gets its own admin token

        def roles() -> list[str]:
            return sorted(http.get("/healthz").json()["role"] for http in https)

        wait_until(lambda: roles() == ["leader", "standby"], "one leader, one standby", 60)
        leader = next(i for i in (0, 1) if https[i].get("/healthz").json()["role"] == "leader")
        standby = 1 - leader
        steps = 30
        ids = []
        for i in range(3):  # submitted to the standby: the store is shared
            text = entrypoint_yaml(
                f"ha{i}", "count_steps", gpus=1, gpu_memory_gb=30, steps=steps, step_s=0.2
            )
            r = https[standby].post(
                "/jobs", content=text, headers={"content-type": "application/yaml"}
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        wait_until(
            lambda: sum(j["state"] == "RUNNING" for j in _jobs(https[standby]).values()) == 2,
            "two jobs running",
            120,
            every_s=0.3,
        )

        os.killpg(procs[leader].pid, signal.SIGKILL)
        procs[leader].wait(timeout=30)
        wait_until(
            lambda: https[standby].get("/healthz").json()["role"] == "leader",
            "the standby to lead",
            60,
            every_s=0.2,
        )
        wait_until(
            lambda: all(j["state"] in TERMINAL for j in _jobs(https[standby]).values()),
            "every job ends",
            240,
            every_s=0.5,
        )
        mlflow = MlflowClient(f"sqlite:///{shared / 'mlflow.db'}")
        for job_id in ids:
            job = https[standby].get(f"/jobs/{job_id}").json()
            assert job["state"] == "SUCCEEDED", job
            ends = [e for e in job["history"] if e["to_state"] in TERMINAL]
            assert len(ends) == 1, job["history"]
            runs = mlflow.search_runs(
                [mlflow.get_experiment_by_name("it").experiment_id],
                filter_string=f"tags.`jobworker.job_id` = '{job_id}'",
            )
            assert len(runs) == 1, f"{job_id} has {len(runs)} MLflow runs"
            counted = [
                int(m.step) for m in mlflow.get_metric_history(runs[0].info.run_id, "counted")
            ]
            assert sorted(counted) == list(range(1, steps + 1))  # every step, once
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
