"""Helpers of the real-time lane tests: models logged straight to MLflow, deployments, load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

from tests.conftest import wait_until
from tests.integration.conftest import Api

DIM = 64


def log_model(tracking_uri: str, name: str, model: torch.nn.Module, pickle: bool = False) -> str:
    """Register ``model`` (64 float inputs) as a new version of ``name``; returns the version."""
    mlflow.set_tracking_uri(tracking_uri)  # the registry follows it (never set it globally)
    example = torch.randn(4, DIM)
    with torch.no_grad():
        output = model(example)
    extra = {"serialization_format": "pickle"} if pickle else {}
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example.numpy(), output.numpy()),
            input_example=example.numpy(),
            registered_model_name=name,
            pip_requirements=["torch"],
            **extra,
        )
    return str(info.registered_model_version)


def deploy_yaml(name: str, model: str, **sections: str) -> str:
    lines = [f"name: {name}", f"model: {model}", "resources: {cpus: 1}"]
    lines += [f"{key}: {value}" for key, value in sections.items()]
    return "\n".join(lines) + "\n"


def deploy(api: Api, text: str) -> dict[str, Any]:
    r = api.http.post("/deployments", content=text, headers={"content-type": "application/yaml"})
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def wait_deployment(
    api: Api, name: str, check: Any = None, timeout_s: float = 180.0
) -> dict[str, Any]:
    """Poll until ``check(deployment)`` holds (default: READY); fail on FAILED."""
    check = check or (lambda d: d["state"] == "READY")
    last: dict[str, Any] = {}

    def there() -> dict[str, Any] | None:
        dep: dict[str, Any] = api.http.get(f"/deployments/{name}").json()
        assert dep["state"] != "FAILED", dep
        last.update(dep)
        return dep if check(dep) else None

    try:
        return wait_until(there, f"deployment {name}", timeout_s, every_s=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {json.dumps(last)[:2000]}") from None


def rows(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32).tolist()


@dataclass
class Traffic:
    """Sequential predictions from a thread until stopped: (status, version, body) each."""

    api: Api
    name: str
    results: list[tuple[int, str | None, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        body = {"inputs": rows(1)}
        headers = {"Authorization": self.api.http.headers["Authorization"]}
        with httpx.Client(base_url=self.api.http.base_url, timeout=30, headers=headers) as http:
            while not self._stop.is_set():
                r = http.post(f"/v1/models/{self.name}/predict", json=body)
                self.results.append((r.status_code, r.headers.get("x-model-version"), r.text))

    def count(self, version: str) -> int:
        """Answers so far from model ``version``."""
        return sum(1 for _, v, _ in list(self.results) if v == version)

    def stop(self) -> list[tuple[int, str | None, str]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)
        return self.results


def open_loop(url: str, rate: float, duration_s: float, token: str) -> dict[str, Any]:
    """Run ``tests/integration/open_loop.py`` in its own process, sending ``token``; its
    JSON summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.open_loop", url, str(rate), str(duration_s)],
        env={**os.environ, "JOBWORKER_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=duration_s + 120,
        check=True,
    )
    return dict(json.loads(proc.stdout))
