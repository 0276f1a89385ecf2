"""Start and stop the embedded MLflow tracking server (SQLite + local artifacts)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx


def start_mlflow_server(home: Path, host: str, port: int) -> subprocess.Popen[bytes]:
    """``mlflow server`` on SQLite under ``home``, serving artifacts from ``home/mlartifacts``."""
    home = home.resolve()
    log = (home / "mlflow-server.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "mlartifacts"),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    return proc


def wait_until_up(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; raise ``RuntimeError`` naming what failed."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {proc.returncode} before {url} answered"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s ({last})")
