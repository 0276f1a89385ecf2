"""The job process against a real MLflow server that goes away: nothing is lost or doubled.

The job process runs directly (``python -m workers.job_runner``, no Ray), as the
training worker actor starts it; the MLflow server is SIGKILLed and started
again on the same port and SQLite backend.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.conftest import mlflow_login, wait_until
from tests.integration.job_process import (
    OUTAGE_ENV,
    MlflowServer,
    checkpoint_steps,
    example_yaml,
    logged_steps,
    outage_scenario,
    start_job,
)
from workers.mlflow_context import LOGGED_STEP_TAG
from workers.mlflow_spool import SPOOL_DIR, Spool


@pytest.mark.timeout(600)  # two starts of an MLflow server and a 30 s outage
def test_job_survives_an_mlflow_outage_mid_training(tmp_path: Path) -> None:
    outage_scenario(tmp_path, down_for_s=30)


def test_a_resumed_attempt_logs_no_step_twice(tmp_path: Path) -> None:
    """Attempt 1 dies (SIGKILL) after MLflow took steps 1-250 and the checkpoint of step 200;
    attempt 2 restarts from that checkpoint and so trains steps 201-250 again."""
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    with mlflow_login(server.home):
        job_dir = tmp_path / "job-resume"
        first = start_job(
            job_dir / "attempt-1",
            example_yaml("resume", 400, 100, gate=tmp_path / "never", gate_step=250),
            server.uri,
        )
        second = None
        try:
            first.wait_for_output("train_example: waiting at the gate after step 250")
            run_id = first.progress()["run_id"]
            client = server.client()
            wait_until(
                lambda: (
                    client.get_run(run_id).data.tags.get(LOGGED_STEP_TAG) == "250"
                    and checkpoint_steps(client, run_id) == [100, 200]
                ),
                "MLflow has the steps through 250 and the checkpoint of step 200",
            )
            first.kill()

            second = start_job(
                job_dir / "attempt-2",
                example_yaml("resume", 400, 100),
                server.uri,
                attempt=2,
                run_id=run_id,
            )
            assert second.finish() == 0, second.output()
            assert second.result()["status"] == "succeeded", second.output()
            assert "train_example: first step 201" in second.output()  # steps 201-250 redone
            for key in ("loss", "accuracy"):
                assert logged_steps(client, run_id, key) == list(range(1, 401)), key
            assert client.get_run(run_id).data.tags[LOGGED_STEP_TAG] == "400"
        finally:
            first.kill()
            if second is not None:
                second.kill()
            server.kill()


def test_a_full_spool_drops_what_does_not_fit_and_says_so(tmp_path: Path) -> None:
    """A 32 KiB spool while MLflow is down for 1000 steps (~110 KiB of metrics); then a
    stop request (SIGTERM), honoured though MLflow is still down."""
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    with mlflow_login(server.home):
        gate = tmp_path / "mlflow-is-down"
        steps, cap_bytes = 1200, 32 * 1024
        job = start_job(
            tmp_path / "job-bound" / "attempt-1",
            example_yaml("bound", steps, 400, gate=gate, gate_step=200),
            server.uri,
            env={**OUTAGE_ENV, "JOBWORKER_SPOOL_MAX_BYTES": str(cap_bytes)},
        )
        try:
            job.wait_for_output("train_example: waiting at the gate after step 200")
            run_id = job.progress()["run_id"]
            server.kill()
            gate.touch()
            last = job.work_dir / "checkpoints" / f"step-{steps:09d}.pt"
            wait_until(last.exists, "the training ends while MLflow is down", 120)
            job.wait_for_output("waiting for MLflow at")
            job.proc.send_signal(signal.SIGTERM)
            assert job.finish() == 0, job.output()
        finally:
            job.kill()
            server.kill()
        assert job.result()["status"] == "stopped", job.output()
        output = job.output()
        assert "no room in the MLflow spool (" in output
        assert "of its 32.0 KiB used, in " in output
        assert "dropping the upload of checkpoint" not in output  # a checkpoint waits as its file
        ranges = re.findall(r"dropped the metrics of steps (\d+)-(\d+): the MLflow spool", output)
        dropped = {s for first, last in ranges for s in range(int(first), int(last) + 1)}
        assert dropped, output
        assert re.search(r"\d+ records for MLflow left in .*mlflow-spool", output), output

        # What the job left for its next attempt is within the bound and holds every step of
        # the outage that it did not say it dropped, once.
        spool = Spool(job.work_dir / SPOOL_DIR, run_id, cap_bytes)
        assert spool.used_bytes <= cap_bytes
        spooled = [
            step
            for e in spool.entries()
            for key, _, _, step in e.record.get("metrics", ())
            if key == "loss"
        ]
        assert len(spooled) == len(set(spooled))
        assert set(range(201, steps + 1)) - dropped <= set(spooled)
        checkpoints = [
            e.record["step"] for e in spool.entries() if e.record["kind"] == "checkpoint"
        ]
        assert checkpoints == [400, 800, 1200]
