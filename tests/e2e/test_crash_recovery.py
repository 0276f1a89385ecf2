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

from tests.conftest import REPO, wait_until
from tests.integration.conftest import entrypoint_yaml, free_port

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def _up(home: Path, port: int, address: str) -> subprocess.Popen[bytes]:
    log = (home / f"up-{time.monotonic_ns()}.log").open("wb")
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
            "--tracking-uri",
            f"sqlite:///{home / 'mlflow.db'}",
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
