"""The Ray Serve servers of ``bench/serving.py``, one variant per process.

    .venv/bin/python bench/serving_rayserve.py --variant proxy --port 8000 \\
        --temp-dir /tmp/ray_serving_x

starts a local Ray (``ray.init`` in this process, its own ``--temp-dir``), Serve with its
HTTP proxy on 127.0.0.1:``--port``, and one replica (``num_cpus=1``, one torch thread) of
the bench MLP at route ``/predict``. Variants:

- ``proxy``: requests go through Serve's HTTP proxy to the replica.
- ``batch``: the same, and the replica batches with ``@serve.batch``.
- ``direct``: Ray Serve's throughput-optimized mode, ``@serve.batch`` on. The caller must
  set ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in this process's environment: Serve reads it at
  import, and the raylet hands it on to the controller and replica processes. In that mode
  (``RAY_SERVE_ENABLE_DIRECT_INGRESS`` defaults to on) every ingress replica starts its own
  uvicorn server on a port the controller allocates (30000-31000 by default); the address
  is read from the controller's target groups (``get_target_groups``, what Serve's own
  ``get_application_urls`` test helper and HAProxy use) and requests go straight there.

When the deployment answers, one line ``READY <url>`` is printed on stdout; the process
then serves until stdin closes or it gets SIGINT/SIGTERM, and shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.schema import LoggingConfig  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from bench.serving_model import (  # noqa: E402
    build_model,
    configure_torch,
    parse_inputs,
    predict,
    predict_many,
)

APP_NAME = "bench"
ROUTE = "/predict"
# Serve's default (5) would cap a replica's in-flight requests, and so its batches, far
# below the bench's 32 connections; the other servers have no such cap either.
MAX_ONGOING_REQUESTS = 256
QUIET_LOGS = LoggingConfig(enable_access_log=False, log_level="WARNING")


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 1},
    logging_config=QUIET_LOGS,
)
class BenchMlp:
    """The bench MLP behind ``POST /predict``; ``batched`` routes rows via ``@serve.batch``."""

    def __init__(self, batched: bool, max_batch_size: int, batch_wait_s: float) -> None:
        configure_torch()
        self.model = build_model()
        self.batched = batched
        # @serve.batch hangs its setters on the wrapper; its type hints don't say so.
        self.predict_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_s)  # type: ignore[attr-defined]

    async def __call__(self, request: Request) -> Response:
        rows = parse_inputs(json.loads(await request.body()))
        outputs = await self.predict_batch(rows) if self.batched else predict(self.model, rows)
        return Response(json.dumps({"outputs": outputs}), media_type="application/json")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def predict_batch(self, batches: list[np.ndarray]) -> list[list[list[float]]]:
        return predict_many(self.model, batches)


def start_ray(temp_dir: Path) -> None:
    """A fresh local Ray owned by this process (never an existing cluster)."""
    for var in ("RAY_ADDRESS", "JOBWORKER_RAY_ADDRESS"):
        os.environ.pop(var, None)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )


def deploy(variant: str, port: int, max_batch_size: int, batch_wait_s: float) -> None:
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config=QUIET_LOGS,
    )
    batched = variant != "proxy"
    app = BenchMlp.bind(batched, max_batch_size, batch_wait_s)  # type: ignore[attr-defined]
    serve.run(app, name=APP_NAME, route_prefix=ROUTE)


def direct_ingress_url(proxy_port: int, timeout_s: float = 60.0) -> str:
    """The replica's own HTTP address, once the controller lists it as a target."""
    client = serve.context._get_global_client()
    assert client is not None, "Serve is not running"
    controller = client._controller
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups: list[Any] = ray.get(controller.get_target_groups.remote(APP_NAME))
        ports = [
            t.port
            for g in groups
            if str(g.protocol).upper().endswith("HTTP")
            for t in g.targets
            if t.port != proxy_port
        ]
        if ports:
            return f"http://127.0.0.1:{ports[0]}{ROUTE}"
        time.sleep(0.2)
    raise RuntimeError(f"no direct-ingress target for {APP_NAME!r} within {timeout_s:.0f}s")


def wait_for_stop() -> None:
    """Block until stdin closes (the parent went away) or SIGINT/SIGTERM arrives."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description="A Ray Serve server for bench/serving.py")
    parser.add_argument("--variant", choices=["proxy", "batch", "direct"], required=True)
    parser.add_argument("--port", type=int, required=True, help="Serve's HTTP proxy port")
    parser.add_argument("--temp-dir", type=Path, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    args = parser.parse_args()
    if args.variant == "direct" and os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1":
        parser.error("--variant direct needs RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment")
    start_ray(args.temp_dir)
    try:
        deploy(args.variant, args.port, args.max_batch_size, args.batch_wait_ms / 1e3)
        if args.variant == "direct":
            url = direct_ingress_url(args.port)
        else:
            url = f"http://127.0.0.1:{args.port}{ROUTE}"
        print(f"READY {url}", flush=True)
        wait_for_stop()
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
