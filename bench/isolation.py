"""Benchmark lane isolation: the demo deployment's latency idle vs beside a training job.

Run from the repository root::

    .venv/bin/python bench/isolation.py [--rounds 5] [--seconds 30] [--warmup 5]
        [--capacity-seconds 10] [--rate 100] [--seed 0]

``jobworker up`` (its own local Ray, a fresh MLflow store, simulated GPUs: all on this
machine, one node) trains the demo job (``configs/train/mlp_synthetic.yaml``) and serves
what it registers with the demo deployment (``configs/serve/mlp_synthetic.yaml``), as
``make demo`` does. The load generator (``bench/serving_loadgen.py``, its own process)
first measures the deployment's capacity (200s/s of a closed loop at 4 connections), then sends
open loops (Poisson arrivals, latency from the scheduled send time) at ``--rate`` req/s
and at 50% of that capacity, for ``--seconds`` after ``--warmup``, idle and *busy*: while
a training job (the demo config with many more steps, nothing registered) runs on the same
node. Each round runs the idle and the busy phase in a random order (``--seed``), a fresh
training job per busy phase, cancelled after it. Per load, the p50/p99 each way and the
busy/idle ratio of each round, then the median ratio over the rounds and its spread
(min-max); errors (non-200 answers and dropped requests) are counted; ``throttles`` is how
many times the SLO guard throttled training (``jobworker_throttles_total``). Last line::

    RESULT isolation p99_idle_ms=… p99_busy_ms=… ratio=… throttles=… errors=…
        half_capacity_rps=… half_p99_idle_ms=… half_p99_busy_ms=… half_ratio=…

(the first four at ``--rate``). Timings on a shared or small machine are noisy: compare
the ratios, measured in one run, rather than absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.serving_model import request_body  # noqa: E402
from bench.serving_procs import free_port, http_ok, launch, stop  # noqa: E402

TRAIN_CONFIG = REPO_ROOT / "configs" / "train" / "mlp_synthetic.yaml"
SERVE_CONFIG = REPO_ROOT / "configs" / "serve" / "mlp_synthetic.yaml"
BUSY_STEPS = 10_000_000  # the busy job trains until cancelled
TIMEOUT_S = 300.0


def _wait(probe: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := probe()) is not None:
            return value
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")


class Api:
    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.http = httpx.Client(
            base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"}
        )

    def post_yaml(self, path: str, text: str) -> dict[str, Any]:
        r = self.http.post(path, content=text, headers={"content-type": "application/yaml"})
        if r.status_code >= 300:
            raise RuntimeError(f"POST {path} answered {r.status_code}: {r.text}")
        return dict(r.json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/jobs/{job_id}").json())

    def wait_job(self, job_id: str, done: Callable[[dict[str, Any]], bool], what: str) -> None:
        def probe() -> bool | None:
            job = self.job(job_id)
            if job["state"] == "FAILED":
                raise RuntimeError(f"job {job_id} failed: {job.get('error')}")
            return True if done(job) else None

        _wait(probe, what)

    def throttles(self) -> int:
        text = self.http.get("/metrics").text
        found = re.findall(r"^jobworker_throttles_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
        return int(sum(float(v) for v in found))


def loadgen(
    url: str, body_file: Path, headers: dict[str, str], mode: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """One run of ``bench/serving_loadgen.py`` in its own process; its JSON summary."""
    parsed = httpx.URL(url)
    cmd = [
        sys.executable,
        str(REPO_ROOT / "bench" / "serving_loadgen.py"),
        *("--host", str(parsed.host), "--port", str(parsed.port)),
        *("--path", parsed.raw_path.decode(), "--body-file", str(body_file)),
        *("--duration", str(args.seconds), "--warmup", str(args.warmup)),
        *mode,
        *(f"--header={k}: {v}" for k, v in headers.items()),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.warmup + args.seconds + 60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def errors(result: dict[str, Any]) -> int:
    statuses: dict[str, int] = result.get("statuses", {})
    return sum(n for s, n in statuses.items() if s != "200") + int(result.get("dropped", 0))


def busy_config(round_no: int) -> str:
    spec = yaml.safe_load(TRAIN_CONFIG.read_text())
    spec["name"] = f"isolation-busy-{round_no}"
    spec["train"]["max_steps"] = BUSY_STEPS
    for key in ("register_as", "register_alias"):
        spec.pop(key, None)
    return str(yaml.safe_dump(spec))


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per load")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds per load")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--capacity-concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="open-loop req/s")
    parser.add_argument("--connections", type=int, default=64, help="open-loop connections")
    parser.add_argument("--seed", type=int, default=0, help="the phases' order")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="jw_isolation_"))
    log_dir = workdir / "logs"
    log_dir.mkdir()
    home = workdir / "jw"
    body_file = workdir / "body.json"
    body_file.write_bytes(request_body(1))
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("jobworker")),
        *("up", "--home", str(home), "--host", "127.0.0.1", "--port", str(port)),
        *("--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"),
    ]
    server = launch("jobworker", cmd, log_dir, markers=[str(home)], cwd=REPO_ROOT)
    rows: dict[str, list[dict[str, dict[str, Any]]]] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        http_ok(server, f"{base}/healthz", TIMEOUT_S)
        api = Api(base, (home / "admin.token").read_text().strip())
        headers = {"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"}
        demo = api.post_yaml("/jobs", TRAIN_CONFIG.read_text())["id"]
        api.wait_job(demo, lambda j: j["state"] == "SUCCEEDED", "the demo job trains")
        name = api.post_yaml("/deployments", SERVE_CONFIG.read_text())["name"]
        _wait(
            lambda: api.http.get(f"/deployments/{name}").json()["state"] == "READY" or None,
            f"deployment {name} READY",
        )
        server.remember_descendants()
        url = f"{base}/v1/models/{name}/predict"
        first = api.http.post(
            url, content=body_file.read_bytes(), headers={"content-type": "application/json"}
        )
        if first.status_code != 200:
            raise RuntimeError(f"a first prediction answered {first.status_code}: {first.text}")
        capacity = loadgen(
            url,
            body_file,
            headers,
            ["--mode", "closed", "--concurrency", str(args.capacity_concurrency)],
            argparse.Namespace(**{**vars(args), "seconds": args.capacity_seconds}),
        )
        half = round(float(capacity["rps"]) / 2, 1)
        print(
            f"capacity: {capacity['rps']:.0f} req/s (closed loop, {args.capacity_concurrency} "
            "connections; "
            f"answers {dict(capacity['statuses'])})"
        )
        if not half:
            raise RuntimeError(f"no capacity measured: {capacity}")
        loads = {"rate": args.rate, "half": half}
        rows = {key: [] for key in loads}
        order = random.Random(args.seed)
        for k in range(args.rounds):
            phases = ["idle", "busy"]
            order.shuffle(phases)
            per: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in loads}
            for phase in phases:
                job_id = None
                if phase == "busy":
                    job_id = api.post_yaml("/jobs", busy_config(k))["id"]
                    api.wait_job(
                        job_id,
                        lambda j: (j.get("progress") or {}).get("step") is not None,
                        "the training job steps",
                    )
                for key, rate in loads.items():
                    mode = ["--mode", "open", "--rate", str(rate)]
                    mode += ["--connections", str(args.connections)]
                    per[key][phase] = loadgen(url, body_file, headers, mode, args)
                if job_id is not None:
                    api.http.post(f"/jobs/{job_id}/cancel")
                    api.wait_job(
                        job_id, lambda j: j["state"] == "CANCELLED", "the training job stops"
                    )
            for key in loads:
                rows[key].append(per[key])
                idle, busy = per[key]["idle"], per[key]["busy"]
                print(
                    f"round {k + 1} {key} ({loads[key]:g} req/s): p50 idle {idle['p50_ms']:.1f} "
                    f"/ busy {busy['p50_ms']:.1f} ms; p99 idle {idle['p99_ms']:.1f} / busy "
                    f"{busy['p99_ms']:.1f} ms ({busy['p99_ms'] / idle['p99_ms']:.2f}x); "
                    f"errors {errors(idle)} / {errors(busy)} (order {'→'.join(phases)})"
                )
        throttles = api.throttles()
    finally:
        stop(server)

    def med(key: str, phase: str, field: str) -> float:
        return statistics.median(float(r[phase][field]) for r in rows[key])

    def ratios(key: str, field: str) -> list[float]:
        return [float(r["busy"][field]) / float(r["idle"][field]) for r in rows[key]]

    total_errors = sum(errors(r[p]) for key in rows for r in rows[key] for p in ("idle", "busy"))
    print(f"\n{'load':<16}{'p50 idle':>10}{'p50 busy':>10}{'p99 idle':>10}{'p99 busy':>10}")
    for key in rows:
        label = f"{key} {loads[key]:g}/s"
        cells = [med(key, p, f) for f in ("p50_ms", "p99_ms") for p in ("idle", "busy")]
        print(f"{label:<16}" + "".join(f"{c:>10.1f}" for c in cells))
        print(
            f"  busy/idle p50 {spread(ratios(key, 'p50_ms'))}, p99 {spread(ratios(key, 'p99_ms'))}"
        )
    print(f"target: p99 busy <= 1.25x idle, 0 errors; the SLO guard throttled {throttles} times")
    print(
        f"RESULT isolation p99_idle_ms={med('rate', 'idle', 'p99_ms'):.1f} "
        f"p99_busy_ms={med('rate', 'busy', 'p99_ms'):.1f} "
        f"ratio={statistics.median(ratios('rate', 'p99_ms')):.2f} throttles={throttles} "
        f"errors={total_errors} half_capacity_rps={half:g} "
        f"half_p99_idle_ms={med('half', 'idle', 'p99_ms'):.1f} "
        f"half_p99_busy_ms={med('half', 'busy', 'p99_ms'):.1f} "
        f"half_ratio={statistics.median(ratios('half', 'p99_ms')):.2f}"
    )
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
