"""The services `jobworker up` starts: the MLflow server with MLflow's basic-auth app and its
login handed on, the local Ray head with token authentication.

One MLflow server and one Ray head, started by ``scheduler.cli.daemons`` as `up` starts
them, serve the module; the control plane's own use of both is tested end to end by
tests/e2e/test_up_submit.py.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from scheduler.cli import daemons
from tests.conftest import REPO, mlflow_login, user_env
from tests.integration.conftest import free_port


@dataclass(frozen=True)
class Services:
    home: Path
    mlflow: daemons.Daemon
    ray: daemons.Daemon


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    home = tmp_path_factory.mktemp("home")
    try:
        mlflow, _ = daemons.mlflow_server(home, free_port())
        with mlflow_login(home):  # as `up` does: the Ray head starts with the login
            ray, _ = daemons.ray_head(home)
        yield Services(home, mlflow, ray)
    finally:
        daemons.stop(home, daemons.RAY, 5.0)
        daemons.stop(home, daemons.MLFLOW)


def _search(services: Services, auth: tuple[str, str] | None) -> int:
    url = f"{services.mlflow.address}/api/2.0/mlflow/experiments/search?max_results=1"
    return httpx.get(url, auth=auth, timeout=30).status_code


def _login(home: Path) -> tuple[str, str]:
    login = daemons.mlflow_credentials(home)
    return login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"]


def test_mlflow_refuses_requests_without_the_homes_login(services: Services) -> None:
    user, password = _login(services.home)
    assert _search(services, None) == 401
    assert _search(services, (user, password + "x")) == 401
    assert _search(services, (user, "password1234")) == 401  # MLflow's old default
    assert _search(services, (user, password)) == 200
    with mlflow_login(services.home):  # MLflow's own client, as jobs and replicas use it
        from mlflow.tracking import MlflowClient

        assert MlflowClient(services.mlflow.address).search_experiments(max_results=1)


def test_the_login_is_readable_by_its_user_only_and_made_per_home(
    services: Services, tmp_path: Path
) -> None:
    config = services.home / daemons.MLFLOW_AUTH
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert _login(tmp_path)[1] != _login(services.home)[1]  # generated, not a default
    assert stat.S_IMODE((tmp_path / daemons.MLFLOW_AUTH).stat().st_mode) == 0o600


def test_a_restarted_up_reuses_the_server_and_its_login(services: Services) -> None:
    again, reused = daemons.mlflow_server(services.home, services.mlflow.port)
    assert reused and again == services.mlflow
    assert _search(services, _login(services.home)) == 200


def test_mlflow_listens_on_loopback_only(services: Services) -> None:
    server = psutil.Process(services.mlflow.pid)
    listening = {
        c.laddr.ip
        for p in (server, *server.children(recursive=True))
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}


def _python(code: str, address: str, home: Path, **env: str) -> str:
    """What ``code`` prints, run with ``address`` as its argument in a fresh interpreter that
    has no Ray token but one in ``env`` (``HOME`` elsewhere: no ~/.ray/auth_token either)."""
    clean = {k: v for k, v in user_env().items() if not k.startswith("RAY_")}
    ran = subprocess.run(
        [sys.executable, "-c", code, address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**clean, "HOME": str(home), **env},
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout.strip().splitlines()[-1]


GCS_PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).internal_kv_keys(b"", namespace=None, timeout=30)
except AuthenticationError:
    print("refused")
else:
    print("answered")
"""


@pytest.mark.parametrize(
    "token_env",
    [{}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}],
    ids=["no token", "another token"],
)
def test_ray_refuses_a_client_without_the_homes_token(
    services: Services, tmp_path: Path, token_env: dict[str, str]
) -> None:
    assert _python(GCS_PROBE, services.ray.address, tmp_path, **token_env) == "refused"
    with_token = daemons.ray_auth(services.home)
    assert _python(GCS_PROBE, services.ray.address, tmp_path, **with_token) == "answered"


WORKER_ENV = """
import os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
login = ray.get(ray.remote(num_cpus=0)(lambda: [
    os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
]).remote())
print(*login)
"""


def test_ray_workers_inherit_the_mlflow_login(services: Services, tmp_path: Path) -> None:
    """The job processes and the replicas run in Ray workers: they log in to MLflow as the
    head was started (the driver here has no login of its own)."""
    printed = _python(WORKER_ENV, services.ray.address, tmp_path, **daemons.ray_auth(services.home))
    assert printed == " ".join(_login(services.home))


def test_a_ray_head_with_another_mlflow_login_is_replaced(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow_login(services.home):
        assert daemons.ray_head(services.home) == (services.ray, True)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "rotated-elsewhere")
    replaced, reused = daemons.ray_head(services.home)
    assert not reused and replaced.pid != services.ray.pid
    assert not services.ray.running()
