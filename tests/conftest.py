"""Shared fixtures: one session-scoped local Ray and one throw-away PostgreSQL server for
every test that needs them, and a store URL on each database backend."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from scheduler import db
from scheduler.cli import daemons
from tests.postgres import INSTALL_HINT, PostgresServer, find_bin_dir

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def wait_until(
    check: Callable[[], T], what: str, timeout_s: float = 60.0, every_s: float = 0.1
) -> T:
    """Poll ``check`` until it returns something truthy, and return that.

    A wait on a condition, never a fixed sleep: ``timeout_s`` only ends a hang,
    with an error that says what never happened (no test asserts a duration).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still not the case after {timeout_s:g} s")
        time.sleep(every_s)


def user_env() -> dict[str, str]:
    """This environment without the settings earlier tests left in it (MLflow's client sets
    ``MLFLOW_TRACKING_URI`` in ``os.environ``): a CLI run as a user would start it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "JOBWORKER_"))}


@contextlib.contextmanager
def mlflow_login(home: Path) -> Iterator[None]:
    """Within it, MLflow's client in this process (and the processes it starts) logs in to
    the MLflow server of jobworker home ``home``: MLflow's client reads the login from
    ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, which it leaves as they were."""
    login = daemons.mlflow_credentials(home)
    before = {key: os.environ.get(key) for key in login}
    os.environ.update(login)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def admin_headers(home: Path) -> dict[str, str]:
    """The ``Authorization`` header with the admin token `up` (or ``wiring.build``) wrote
    under ``home``."""
    return {"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"}


SIM_NODE = "jobworker_sim_node_"  # workers.ray_cluster.SIM_NODE_RESOURCE


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A 3-node Ray cluster on this machine: the head is the simulated node "local" of
    configs/cluster/local_sim.yaml, the two workers are "node-a" and "node-b" of
    configs/cluster/two_nodes_sim.yaml."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "include_dashboard": False,
            "resources": {f"{SIM_NODE}local": 1},
        },
    )
    for name in ("node-a", "node-b"):
        cluster.add_node(num_cpus=2, resources={f"{SIM_NODE}{name}": 1})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own for this test run, on loopback; gone at the end."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = PostgresServer.start(bin_dir)
    try:
        wait_until(server.ready, f"PostgreSQL ({bin_dir}) accepts connections", timeout_s=60)
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh, empty PostgreSQL database, dropped after the test.

    Dropped with its connections cut: request it (or ``store_url``) before fixtures that
    hold engines on it, such as ``make_api``, so that they are torn down first.
    """
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty job store on each backend: a SQLite file, a PostgreSQL database."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return db.sqlite_url(tmp_path / "jobs.db")
