"""The embedded set-up (`jobworker up` with its own Ray and MLflow server) survives a SIGKILL.

As a user runs it: `up --detach` with no addresses, jobs running and queued, the
`up` process alone killed with SIGKILL, `up` again with the same flags. Ray and the
MLflow server are daemons: the running jobs go on, the restarted control plane
re-attaches to them, and `down` stops everything and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
from mlflow.tracking import MlflowClient

from scheduler.cli import daemons
from tests.conftest import REPO, admin_headers, mlflow_login, user_env, wait_until
from tests.integration.conftest import entrypoint_yaml, free_port

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def jobworker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**user_env(), "COLUMNS": "250"},
    )


def recorded(home: Path, name: str) -> dict[str, Any]:
    return dict(json.loads((home / f"{name}.json").read_text()))


def home_processes(home: Path, pids: set[int]) -> list[str]:
    """Processes left of this home: a recorded pid or one of its process group (Ray's
    processes and workers), or a command line naming the home or its Ray's directory
    (the job processes)."""
    marks = (str(home), str(daemons.ray_temp_dir(home)))
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        try:
            group = os.getpgid(proc.info["pid"])
        except ProcessLookupError:
            continue
        if {proc.info["pid"], group} & pids or any(m in cmdline for m in marks):
            left.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return left


def test_sigkill_of_embedded_up_loses_nothing_and_down_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port, mlflow_port = free_port(), free_port()
    flags = ("--home", str(home), "--port", str(port), "--mlflow-port", str(mlflow_port))
    api = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=api, timeout=30)
    started = jobworker("up", "--detach", *flags)
    assert started.returncode == 0, started.stdout + started.stderr
    http.headers.update(admin_headers(home))
    pids: set[int] = set()
    try:
        first = recorded(home, "api")
        pids |= {first["pid"], recorded(home, "ray")["pid"], recorded(home, "mlflow")["pid"]}

        # A second `up` on this home fails, names the running one, and changes nothing.
        again = jobworker("up", "--detach", *flags)
        assert again.returncode == 1
        assert "already up" in again.stderr and f"pid {first['pid']}" in again.stderr
        assert recorded(home, "api") == first

        steps, gate = 40, tmp_path / "go"  # every job waits at step 20 for the gate
        ids = [
            http.post(
                "/jobs",
                content=entrypoint_yaml(
                    f"job{i}", "count_steps", gpus=1, steps=steps, gate=str(gate), gate_step=20
                ),
                headers={"content-type": "application/yaml"},
            ).json()["id"]
            for i in range(4)  # two simulated GPUs: two run, two wait
        ]

        def two_past_step_10() -> bool:  # (progress is reported a few steps behind)
            jobs = [http.get(f"/jobs/{i}").json() for i in ids]
            return sum(1 for j in jobs if ((j["progress"] or {}).get("step") or 0) > 10) == 2

        wait_until(two_past_step_10, "two jobs past step 10", 180, every_s=0.5)
        running = {j["id"] for j in http.get("/jobs").json() if j["state"] == "RUNNING"}
        assert len(running) == 2

        os.kill(first["pid"], signal.SIGKILL)  # the control plane alone
        wait_until(lambda: not psutil.pid_exists(first["pid"]), "up to be gone", 30)
        restarted = jobworker("up", "--detach", *flags)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        log = (home / "jobworker.log").read_text()
        assert "re-using MLflow server" in log and "re-using local Ray" in log
        pids.add(recorded(home, "api")["pid"])
        gate.touch()

        def all_done() -> dict[str, dict[str, Any]] | None:
            jobs = {i: http.get(f"/jobs/{i}", params={"history": True}).json() for i in ids}
            return jobs if all(j["state"] in TERMINAL for j in jobs.values()) else None

        jobs = wait_until(all_done, "every job to end", 300, every_s=0.5)
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        with mlflow_login(home):
            for job_id, job in jobs.items():
                assert job["state"] == "SUCCEEDED", job
                ends = [e for e in job["history"] if e["to_state"] in TERMINAL]
                assert len(ends) == 1
                if job_id in running:  # it kept running through the restart: one attempt
                    assert job["attempts"] == 1 and job["losses"] == 0
                runs = client.search_runs(
                    [client.get_run(job["run_id"]).info.experiment_id],
                    filter_string=f"tags.`jobworker.job_id` = '{job_id}'",
                )
                assert len(runs) == 1
                counted = [int(m.step) for m in client.get_metric_history(job["run_id"], "counted")]
                assert sorted(counted) == list(range(1, steps + 1))  # every step, once
    finally:
        stopped = jobworker("down", "--home", str(home))
    assert stopped.returncode == 0, stopped.stderr
    for name in ("api", "ray", "mlflow"):
        assert f"stopped {name} (pid" in stopped.stdout
    wait_until(lambda: not home_processes(home, pids), "every process of the home to exit", 60)
    assert not home_processes(home, pids)
    nothing = jobworker("down", "--home", str(home))
    assert nothing.returncode == 1 and "nothing to stop" in nothing.stderr
