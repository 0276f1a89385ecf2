"""Benchmark model serving: jobworker against plain FastAPI and three Ray Serve set-ups.

Run from anywhere::

    .venv/bin/python bench/serving.py [--servers fastapi,rayserve,rayserve-batch,
        rayserve-direct,jobworker,jobworker-noauth] [--rounds 3] [--seconds 5]
        [--warmup 1] [--concurrency 1,8,32] [--rate 1000] [--connections 64]
        [--batch-wait-ms 0] [--ray-worker-niceness 0] [--seed N] [--keep]

A short run: ``--servers fastapi,rayserve-direct,jobworker --rounds 3 --seconds 2 --rate 0``.

The same model, an MLP 64→256→256→10 in float32 on CPU with one torch thread per server
process (``bench/serving_model.py``, fixed seed), behind ``POST`` JSON
``{"inputs": [[64 floats]]}`` → ``{"outputs": [[10 floats]], …}``:

- ``fastapi``: FastAPI + uvicorn (uvloop, httptools) calling torch in-process
  (``bench/serving_fastapi.py``).
- ``rayserve``: Ray Serve, one replica (``num_cpus=1``), through Serve's HTTP proxy.
- ``rayserve-batch``: the same with ``@serve.batch(max_batch_size=32)``.
- ``rayserve-direct``: Ray Serve's throughput-optimized mode
  (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, which turns on direct ingress), ``@serve.batch``
  on, requests sent straight to the replica's own HTTP port (``bench/serving_rayserve.py``).
- ``jobworker``: ``jobworker up`` with ``models:/bench-mlp/1`` logged to a fresh MLflow
  store and deployed with batching 32 / 0 ms (``bench/serving_jobworker.py``); requests
  carry the admin token, checked on every request.
- ``jobworker-noauth``: the same, with the token check replaced by a fixed admin identity
  (``bench/serving_noauth.py``), to measure what checking the token costs.

The bench runs ``--rounds`` interleaved rounds. Each round starts every server once, in a
shuffled order, and runs every load on it, in a shuffled order; so a slow spell of the
(shared) machine falls on different servers in different rounds. Servers run one at a time
(the machine has two cores), each started fresh, checked (the first response must hold one
row of 10 outputs, or the server counts as failed in that round), loaded, and torn down
with every process it spawned. All on 127.0.0.1, access logs off. Ray-based servers
get ``RAY_worker_niceness=0`` (``--ray-worker-niceness``): Ray's default nice 15 for its
workers would hand the request path's Ray processes a fraction of a shared core next to
the nice-0 load generator and API processes.

For each server the load generator (``bench/serving_loadgen.py``, its own process, raw
asyncio HTTP/1.1 keep-alive) runs closed loops at each ``--concurrency`` and one open
loop at ``--rate`` req/s (Poisson arrivals over ``--connections`` connections, latency
from the scheduled send time). Each load gets ``--warmup`` unmeasured seconds, then
``--duration`` measured. A server that cannot keep up with the open loop shows its
capacity as req/s, latencies that grow with the backlog, and the arrivals still unsent
a few seconds after the end as ``dropped``.

It prints a table (per server and load: the median over rounds of req/s, p50 and p99 ms,
each with its min-max spread, and the non-200 count summed over rounds), the targets, and
last (``bench/serving_report.py``)::

    RESULT serving c32_vs_best_rayserve_x=… c1_p50_vs_fastapi_x=… c32_rps=… c1_p50_ms=…
        auth_c1_p50_x=… auth_c32_rps_x=… c32_x_spread=LO-HI c1_x_spread=LO-HI
        c32_p99_ms=… best_rayserve_c32_p99_ms=… rounds=N non200=server:n,… failed=…

Ratios are taken within each round, then their median (and ``*_spread``, min-max) over
rounds is printed. ``c32_vs_best_rayserve_x`` is jobworker's req/s at concurrency 32 over
that of the Ray Serve variant with the most req/s there in the same round;
``c1_p50_vs_fastapi_x`` is jobworker's p50 at concurrency 1 over FastAPI's;
``c32_rps``, ``c1_p50_ms`` and ``c32_p99_ms`` are jobworker's medians;
``best_rayserve_c32_p99_ms`` is the median p99 of each round's best Ray Serve variant;
``auth_c1_p50_x`` and ``auth_c32_rps_x`` compare jobworker with ``jobworker-noauth`` (the
token check's cost: above 1 and below 1 respectively). A ratio is ``nan`` when a side of
it did not run, failed to start in some round, or answered anything but 200 at that load
(for the Ray Serve side: any variant that was run). Exit status 1 if any server failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from bench.serving_model import OUT_FEATURES, request_body  # noqa: E402
from bench.serving_procs import (  # noqa: E402
    ServerFailed,
    ServerProcess,
    free_port,
    http_ok,
    launch,
    ready_line,
    stop,
)
from bench.serving_report import (  # noqa: E402
    RAY_VARIANTS,
    Load,
    Report,
    Row,
    print_table,
    result_line,
)

BENCH_DIR = REPO_ROOT / "bench"
SERVERS = (
    "fastapi",
    "rayserve",
    "rayserve-batch",
    "rayserve-direct",
    "jobworker",
    "jobworker-noauth",
)
RAY_VARIANT_ARG = {"rayserve": "proxy", "rayserve-batch": "batch", "rayserve-direct": "direct"}
START_TIMEOUT_S = 180.0
SETTLE_S = 2.0  # between servers: let the last one's exit finish before the next starts


# -- servers -------------------------------------------------------------------------------
def start_fastapi(log_dir: Path, launched: list[ServerProcess]) -> str:
    port = free_port()
    cmd = [sys.executable, str(BENCH_DIR / "serving_fastapi.py"), "--port", str(port)]
    server = launch("fastapi", cmd, log_dir)
    launched.append(server)
    # A GET on a POST route answers 405 once uvicorn serves; /docs answers 200.
    http_ok(server, f"http://127.0.0.1:{port}/docs", START_TIMEOUT_S)
    return f"http://127.0.0.1:{port}/predict"


def ray_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of a server that starts its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "JOBWORKER_RAY_ADDRESS"}}
    if args.ray_worker_niceness != "ray":
        # Ray starts its workers (Serve's proxy and replicas, jobworker's replicas) at
        # nice 15; on two shared cores that starves them next to the nice-0 load generator
        # and API processes, so by default every process on the request path gets nice 0.
        env["RAY_worker_niceness"] = args.ray_worker_niceness
    return env


def start_rayserve(
    name: str, log_dir: Path, args: argparse.Namespace, launched: list[ServerProcess]
) -> str:
    variant = RAY_VARIANT_ARG[name]
    temp_dir = tempfile.mkdtemp(prefix=f"ray_sv_{variant}_", dir="/tmp")
    env = ray_env(args)
    env["PYTHONPATH"] = str(REPO_ROOT)
    if variant == "direct":
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        # Teardown only: a direct-ingress replica otherwise drains for 30 s on shutdown.
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    cmd = [
        sys.executable,
        str(BENCH_DIR / "serving_rayserve.py"),
        "--variant",
        variant,
        "--port",
        str(free_port()),
        "--temp-dir",
        temp_dir,
        "--batch-wait-ms",
        str(args.batch_wait_ms),
    ]
    server = launch(
        name,
        cmd,
        log_dir,
        env=env,
        markers=[temp_dir],
        keep_stdin=True,
        remove_dirs=[Path(temp_dir)],
    )
    launched.append(server)
    return ready_line(server, START_TIMEOUT_S)


def start_server(
    name: str, workdir: Path, args: argparse.Namespace, launched: list[ServerProcess]
) -> str:
    """Start server ``name`` (appending its process to ``launched`` first); its predict URL."""
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if name == "fastapi":
        return start_fastapi(log_dir, launched)
    if name in RAY_VARIANTS:
        return start_rayserve(name, log_dir, args, launched)
    from bench.serving_jobworker import register_model, start_jobworker

    home = workdir / name  # each jobworker its own MLflow store and home
    print(f"  registered {register_model(home)} in {home / 'mlflow.db'}", flush=True)
    program = (
        [sys.executable, str(BENCH_DIR / "serving_noauth.py")] if name.endswith("noauth") else None
    )
    return start_jobworker(home, log_dir, ray_env(args), launched, program=program)


def request_headers(name: str, workdir: Path) -> dict[str, str]:
    """What server ``name`` needs on each request besides the body: jobworker, a token
    (``jobworker-noauth`` checks none, so none is sent)."""
    if name != "jobworker":
        return {}
    from bench.serving_jobworker import auth_headers

    return auth_headers(workdir / name)


def verify(server: ServerProcess, url: str, body: bytes, headers: dict[str, str]) -> None:
    """The first response must be 200 with one row of ``OUT_FEATURES`` outputs."""
    resp = httpx.post(
        url, content=body, headers={"content-type": "application/json", **headers}, timeout=30
    )
    try:
        outputs = resp.json()["outputs"]
        ok = resp.status_code == 200 and len(outputs) == 1 and len(outputs[0]) == OUT_FEATURES
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise server.fail(f"bad first response from {url}: {resp.status_code} {resp.text[:300]}")


@contextlib.contextmanager
def serving(name: str, workdir: Path, args: argparse.Namespace, body: bytes) -> Iterator[str]:
    """Start server ``name``, check its first answer, yield its URL, then tear it down."""
    t0 = time.monotonic()
    launched: list[ServerProcess] = []
    try:
        url = start_server(name, workdir, args, launched)
        verify(launched[-1], url, body, request_headers(name, workdir))
        print(f"  {name} ready at {url} after {time.monotonic() - t0:.1f}s", flush=True)
        yield url
    finally:
        for server in launched:
            leftovers = stop(server)
            if leftovers:
                print(f"  {name}: killed {len(leftovers)} leftover processes", flush=True)
        time.sleep(SETTLE_S)


# -- load ----------------------------------------------------------------------------------
def run_load(
    url: str,
    load: Load,
    body_file: Path,
    args: argparse.Namespace,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the load generator in its own process (sending ``headers``); its JSON summary."""
    parsed = httpx.URL(url)
    cmd = [
        sys.executable,
        str(BENCH_DIR / "serving_loadgen.py"),
        "--host",
        parsed.host,
        "--port",
        str(parsed.port),
        "--path",
        parsed.raw_path.decode(),
        "--body-file",
        str(body_file),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        *load.loadgen_args(args.connections),
        *(f"--header={k}: {v}" for k, v in (headers or {}).items()),
    ]
    timeout_s = args.warmup + args.duration + 60
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_server(
    name: str,
    loads: Sequence[Load],
    workdir: Path,
    args: argparse.Namespace,
    body: bytes,
    round_no: int,
    rows: list[Row],
) -> None:
    """Start ``name`` fresh, run ``loads`` on it in their order, appending to ``rows``."""
    body_file = workdir / "body.json"
    with serving(name, workdir, args, body) as url:
        for load in loads:
            headers = request_headers(name, workdir)
            row = Row(name, load, run_load(url, load, body_file, args, headers), round_no)
            rows.append(row)
            r = row.result
            print(
                f"  {name:16s} {load.name:14s} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:.3f} ms"
                f"  p99 {r['p99_ms']:.3f} ms  non-200 {row.non_200()}",
                flush=True,
            )


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default=",".join(SERVERS), help="comma list, in run order")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each: every server)")
    p.add_argument(
        "--seconds",
        "--duration",
        dest="duration",
        type=float,
        default=5.0,
        help="measured seconds per load",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the shuffled order")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per load")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop connection counts")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop req/s (0: none)")
    p.add_argument("--connections", type=int, default=64, help="open-loop connection pool")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="@serve.batch wait")
    p.add_argument(
        "--ray-worker-niceness",
        default="0",
        help="RAY_worker_niceness for the Ray-based servers ('ray': leave Ray's default, 15)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, MLflow)")
    args = p.parse_args(argv)
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.server_list) - set(SERVERS))
    if unknown:
        p.error(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loads = [Load("closed", concurrency=c) for c in args.concurrency_list]
    if args.rate > 0:
        loads.append(Load("open", rate=args.rate))
    workdir = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    body = request_body()
    rows: list[Row] = []
    failed: dict[str, set[int]] = {}
    shuffle = random.Random(args.seed).shuffle
    print(f"{os.cpu_count()} CPUs; load average at start {_loadavg()}", flush=True)
    try:
        for round_no in range(args.rounds):
            order = list(args.server_list)
            shuffle(order)
            print(f"round {round_no + 1}/{args.rounds}: {', '.join(order)}", flush=True)
            for name in order:
                round_loads = list(loads)
                shuffle(round_loads)
                print(f"[{name}] starting", flush=True)
                round_dir = workdir / f"round{round_no + 1}"  # a fresh home, MLflow and logs
                round_dir.mkdir(exist_ok=True)
                (round_dir / "body.json").write_bytes(body)
                try:
                    bench_server(name, round_loads, round_dir, args, body, round_no, rows)
                except (
                    ServerFailed,
                    RuntimeError,
                    subprocess.TimeoutExpired,
                    httpx.HTTPError,
                ) as exc:
                    failed.setdefault(name, set()).add(round_no)
                    print(f"\n!!! {name} FAILED: {exc}\n", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = Report(rows, failed, args.rounds)
    print_table(report, loads, args.server_list)
    print(f"load average at end {_loadavg()} (other work on the machine skews the numbers)")
    if failed:
        where = "; ".join(f"{s} in round(s) {sorted(n + 1 for n in r)}" for s, r in failed.items())
        print(f"\nFAILED: {where} (see the messages above); ratios against them: n/a")
    print(result_line(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
