"""End to end as a user runs it: `jobworker up` with a real MLflow server, then the CLI."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import httpx
from mlflow.tracking import MlflowClient

from scheduler.cli import daemons
from tests.conftest import REPO, admin_headers, mlflow_login, user_env, wait_until
from tests.integration.conftest import free_port


def jobworker(
    *args: str, timeout_s: float = 300, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would; ``home`` as ``JOBWORKER_HOME`` (where it finds the token)."""
    found = {"JOBWORKER_HOME": str(home)} if home else {}
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={**user_env(), "COLUMNS": "200", **found},
    )


def test_up_submit_wait_status_logs_down(tmp_path: Path) -> None:
    port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{port}"
    home = tmp_path / "home"
    started = jobworker(
        "up",
        "--detach",
        "--home",
        str(home),
        "--port",
        str(port),
        "--mlflow-port",
        str(mlflow_port),
        "--public-url",
        "https://jobworker.example",
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        wait_until(  # the first pass takes the leader lease
            lambda: httpx.get(f"{api}/healthz").json() == {"status": "ok", "role": "leader"},
            "the control plane to lead",
        )
        # The first `up` wrote an admin token that only its user can read; the API
        # refuses anyone without a token, and the CLI finds it under the home.
        token_file = home / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o700  # its databases too
        assert httpx.get(f"{api}/jobs").status_code == 401
        refused = jobworker("status", "--api", api, home=tmp_path / "elsewhere")
        assert refused.returncode == 2 and "401" in refused.stderr, refused.stderr
        assert "--token or JOBWORKER_TOKEN" in refused.stderr
        submitted = jobworker(
            "submit", "configs/train/mlp_synthetic.yaml", "--wait", "--api", api, home=home
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "SUCCEEDED" in submitted.stdout
        assert f"http://127.0.0.1:{mlflow_port}/#/experiments/" in submitted.stdout
        job = httpx.get(f"{api}/jobs", headers=admin_headers(home)).json()[0]

        status = jobworker("status", job["id"], "--api", api, "--token", token_file.read_text())
        assert status.returncode == 0
        assert "PENDING" in status.stdout and "SUCCEEDED" in status.stdout

        logs = jobworker("logs", job["id"], "-f", "--api", api, home=home)
        assert f"jobworker: job {job['id']}" in logs.stdout

        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        with mlflow_login(home):  # the job logged in with the same login (basic-auth is on)
            run = client.get_run(job["run_id"])
            assert len(client.get_metric_history(run.info.run_id, "loss")) == 300
            assert any(a.path == "config.yaml" for a in client.list_artifacts(run.info.run_id))
            page = f"https://jobworker.example/ui/jobs/{job['id']}"  # up's --public-url
            assert f"]({page})" in run.data.tags["mlflow.note.content"]
            version = client.get_model_version("mlp-synthetic", job["model_version"])
            assert version.run_id == run.info.run_id

        # The rest of `make demo`, on the same real MLflow server: train again (the alias
        # moves to version 2), deploy configs/serve/mlp_synthetic.yaml, answer a prediction.
        demo = jobworker(
            "demo", "--home", str(home), "--api", api, "--mlflow-port", str(mlflow_port)
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "already up" in demo.stdout and "READY" in demo.stdout
        assert "from mlp-synthetic version 2" in demo.stdout
        assert f"MLflow UI: http://127.0.0.1:{mlflow_port}" in demo.stdout
        assert f"Console: {api}/ui" in demo.stdout
        login = daemons.mlflow_credentials(home)
        password = login["MLFLOW_TRACKING_PASSWORD"]
        assert f"log in as admin with password {password}" in demo.stdout
        log = (home / "jobworker.log").read_text()  # up's own output names the file only
        assert f"MLflow UI login: user admin, password in {home.resolve()}" in log
        assert password not in log
        predicted = jobworker(
            "predict", "mlp-synthetic", "--data", str([[0.5] * 64]), "--api", api, home=home
        )
        assert predicted.returncode == 0, predicted.stderr
        assert "model mlp-synthetic version 2" in predicted.stdout
        listed = jobworker("deployments", "--api", api, home=home)
        assert "mlp-synthetic" in listed.stdout and "READY" in listed.stdout

        missing = jobworker("status", "j-nope", "--api", api, home=home)
        assert missing.returncode == 2
        assert "no job 'j-nope'" in missing.stderr
    finally:
        stopped = jobworker("down", "--home", str(home))
        assert stopped.returncode == 0, stopped.stderr
    unreachable = jobworker("status", "--api", api)
    assert unreachable.returncode == 3
    assert "is `jobworker up` running?" in unreachable.stderr
