"""The job process run directly (no Ray, no scheduler) against a real MLflow server that a
test may kill and start again on the same port and backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from scheduler.cli import daemons
from tests.conftest import REPO, mlflow_login, wait_until
from tests.integration.conftest import free_port
from workers.interface.executor import LaunchRequest, NodeAssignment
from workers.interface.spec import load_spec

# The job gives up on a call at once and waits on its own: an outage goes past
# MLflow's client retries in seconds, not minutes.
OUTAGE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@dataclass
class MlflowServer:
    """``mlflow server`` on SQLite and local artifacts under ``home``, on one port for life:
    the daemon `jobworker up` starts (``scheduler.cli.daemons``)."""

    home: Path
    port: int = field(default_factory=free_port)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        daemons.mlflow_server(self.home, self.port, timeout_s=180)

    def kill(self) -> None:
        """SIGKILL the server's process group: no goodbye to its clients."""
        server = daemons.record(self.home, daemons.MLFLOW)
        if server is not None and server.running():
            os.killpg(server.pid, signal.SIGKILL)
            wait_until(lambda: not server.running(), "the MLflow server to die", 30)

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


def example_yaml(
    name: str, max_steps: int, every: int, gate: Path | None = None, gate_step: int = 0
) -> str:
    """A job training the example config's model (see ``user_code.train_example``)."""
    config = {"max_steps": max_steps, "checkpoint_every_steps": every, "gate_step": gate_step}
    if gate is not None:
        config["gate"] = str(gate)  # type: ignore[assignment]
    return (
        f"name: {name}\nexperiment: outage\n"
        "entrypoint: tests.integration.user_code:train_example\n"
        f"config: {json.dumps(config)}\ntrain: {{max_steps: {max_steps}}}\n"
        f"resources: {{cpus: 1, memory_gb: 1}}\nregister_as: {name}\n"
    )


@dataclass
class JobProcess:
    """One attempt's job process and its work dir (launch.json, output.log, progress, result)."""

    work_dir: Path
    proc: subprocess.Popen[bytes]

    def output(self) -> str:
        return (self.work_dir / "output.log").read_text(errors="replace")

    def progress(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.work_dir / "progress.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.work_dir / "result.json").read_text())
        return data

    def step(self) -> int:
        return int(self.progress().get("step") or 0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_step(self, step: int, timeout_s: float = 120) -> None:
        def reached() -> bool:
            assert self.alive(), f"the job exited early:\n{self.output()}"
            return self.step() >= step

        wait_until(reached, f"the job reaches step {step}", timeout_s)

    def wait_for_output(self, text: str, timeout_s: float = 60) -> None:
        wait_until(lambda: text in self.output(), f"the job's output says {text!r}", timeout_s)

    def finish(self, timeout_s: float = 180) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not end:\n{self.output()}") from None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_job(
    work_dir: Path,
    text: str,
    tracking_uri: str,
    *,
    attempt: int = 1,
    run_id: str | None = None,
    env: dict[str, str] | None = None,
) -> JobProcess:
    """``python -m workers.job_runner work_dir`` for attempt ``attempt`` of job ``work_dir``'s
    parent (the executor's layout: one work dir per attempt in the job's dir)."""
    job_id = work_dir.parent.name
    launch = LaunchRequest(
        job_id=job_id,
        attempt=attempt,
        node=NodeAssignment(node_id="local", hostname="local"),
        spec=load_spec(text),
        source_text=text,
        tracking_uri=tracking_uri,
        run_id=run_id,
        tags={"jobworker.job_id": job_id},
    )
    work_dir.mkdir(parents=True)
    (work_dir / "launch.json").write_text(launch.model_dump_json())
    log = (work_dir / "output.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.job_runner", str(work_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=work_dir,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )
    log.close()
    return JobProcess(work_dir, proc)


def logged_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """The steps of metric ``key`` in the run, in order, each as often as MLflow holds it."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def checkpoint_steps(client: MlflowClient, run_id: str) -> list[int]:
    names = [Path(a.path).stem for a in client.list_artifacts(run_id, "checkpoints")]
    return sorted(int(n.removeprefix("step-")) for n in names)


def outage_scenario(tmp_path: Path, down_for_s: float) -> None:
    """MLflow SIGKILLed mid-training, kept down while the training ends and for ``down_for_s``,
    then started again on the same port and backend: the job ends as if nothing happened."""
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    with mlflow_login(server.home):
        gate = tmp_path / "mlflow-is-down"
        steps, every = 600, 100
        job = start_job(
            tmp_path / "job-outage" / "attempt-1",
            example_yaml("outage", steps, every, gate=gate, gate_step=200),
            server.uri,
            env=OUTAGE_ENV,
        )
        try:
            job.wait_for_output("train_example: waiting at the gate after step 200")
            server.kill()
            down_at = time.monotonic()
            gate.touch()
            last = job.work_dir / "checkpoints" / f"step-{steps:09d}.pt"
            wait_until(last.exists, "the training ends while MLflow is down", 120)
            job.wait_for_output(f"waiting for MLflow at {server.uri}: ")

            def outage_over() -> bool:
                assert job.alive(), f"the job ended while MLflow was down:\n{job.output()}"
                return time.monotonic() - down_at >= down_for_s

            wait_until(outage_over, f"{down_for_s:g} s of outage", down_for_s + 60, every_s=1)
            server.start()
            assert job.finish() == 0, job.output()
            result = job.result()
            assert result["status"] == "succeeded", job.output()
            client, run_id = server.client(), result["run_id"]
            for key in ("loss", "accuracy"):
                assert logged_steps(client, run_id, key) == list(range(1, steps + 1)), key
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED"
            assert run.data.params["config.max_steps"] == str(steps)
            assert run.data.params["entrypoint"] == "tests.integration.user_code:train_example"
            assert run.data.tags["jobworker.outcome"] == "succeeded"
            assert checkpoint_steps(client, run_id) == list(range(every, steps + 1, every))
            versions = client.search_model_versions("name = 'outage'")
            assert [(v.version, v.run_id) for v in versions] == [("1", run_id)]
            assert result["model_version"] == "1"
            assert f"MLflow at {server.uri} answers again" in job.output()
        finally:
            job.kill()
            server.kill()
