"""Time the first render of each console page at scale (issue 14: under 300 ms each).

Run from the repository root::

    .venv/bin/python bench/console.py [--jobs N] [--nodes K] [--rounds R]

The real app (``create_app``) over a real SQLite job store holding ``--jobs``
jobs (1,000: 60 % pending, 30 % running on 1-8 GPUs, 10 % succeeded), a
cluster view of ``--nodes`` nodes (128) x 8 simulated GPUs read through the
simulated backend (``workers.sim_backend``, a tenth of the GPUs with memory held
outside), twelve deployments with two replicas and traffic each, and a queue
view of every pending job in order with its reasons. Each page is asked for
through Starlette's TestClient with an admin token, ``--rounds`` times (7) after
one warm-up; the figure is the median wall time of the server's answer.

Then the same app is served over real HTTP (uvicorn on 127.0.0.1) and each page is
opened ``--rounds`` times in Debian's headless chromium (driven by Playwright over
CDP, as ``tests/browser`` does; ``--no-browser`` skips it): the figure is the median
first contentful paint (``performance``'s ``first-contentful-paint``, from the start
of navigation: request, answer, parse, style, paint).

Last line: ``RESULT console gpus_ms=… … deployments_ms=… browser_gpus_ms=… …``
(server answer, then browser first paint). No assertions.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from scheduler import db  # noqa: E402
from scheduler.api.app import Serving, create_app  # noqa: E402
from scheduler.api.auth import Auth  # noqa: E402
from scheduler.api.console.data import ConsoleSources  # noqa: E402
from scheduler.api.views import cluster_table  # noqa: E402
from scheduler.auth.audit import AuditStore  # noqa: E402
from scheduler.auth.identity import Role  # noqa: E402
from scheduler.auth.model_names import ModelNames  # noqa: E402
from scheduler.auth.tokens import TokenStore  # noqa: E402
from scheduler.batch.service import JobService  # noqa: E402
from scheduler.batch.store import JobStore  # noqa: E402
from scheduler.core.model import Holding  # noqa: E402
from scheduler.core.states import JobState  # noqa: E402
from scheduler.realtime.metrics import ServingMetrics  # noqa: E402
from scheduler.realtime.router import Router  # noqa: E402
from scheduler.realtime.service import DeploymentService  # noqa: E402
from scheduler.realtime.spec import load_deployment  # noqa: E402
from scheduler.realtime.store import DeploymentStore  # noqa: E402
from tests.browser.chromium import headless_chromium  # noqa: E402
from workers.interface.executor import Assignment, NodeAssignment  # noqa: E402
from workers.interface.replicas import ResolvedModel  # noqa: E402
from workers.interface.spec import load_spec  # noqa: E402
from workers.interface.telemetry import GIB, NodeReading  # noqa: E402
from workers.sim_backend import SimGpuSpec, SimNodeSpec, SimulatedBackend  # noqa: E402

GPUS_PER_NODE = 8
TEAMS = ("vision", "nlp", "speech", "ranking")
PAGES = ("gpus", "queue", "jobs", "job", "deployments")
JOB = """
name: bench-{i}
team: {team}
priority: {priority}
model: {{name: mlp}}
data: {{name: synthetic_classification}}
train: {{max_steps: 1000}}
resources: {{gpus: {gpus}, gpu_memory_gb: 10, cpus: 1, memory_gb: 1}}
"""


def readings(nodes: int) -> list[NodeReading]:
    out = []
    for n in range(nodes):
        name = f"node-{n:03d}"
        spec = SimNodeSpec(
            name=name,
            cpus=64,
            memory_gb=512,
            gpus=[
                SimGpuSpec(type="A100", memory_gb=80, external_memory_gb=8 if n % 10 == 0 else 0)
                for _ in range(GPUS_PER_NODE)
            ],
        )
        gpus = SimulatedBackend(spec).read()
        out.append(NodeReading(name, name, 64, 512 * GIB, gpus, "simulated", time.time()))  # type: ignore[arg-type]
    return out


def fill_store(store: JobStore, nodes: list[NodeReading], jobs: int, rng: random.Random) -> str:
    """``jobs`` jobs in the store; the id of a running one."""
    free = [(node, g) for node in nodes for g in node.gpus]
    rng.shuffle(free)
    running_id = ""
    for i in range(jobs):
        gpus = rng.choice((1, 1, 2, 4, 8))
        text = JOB.format(i=i, team=rng.choice(TEAMS), priority=rng.randint(0, 50), gpus=gpus)
        job = store.create(load_spec(text), text)
        kind = i % 10
        if kind < 6 or not free:
            continue
        node, first = free.pop()
        others = [g for g in node.gpus if g.uuid != first.uuid and rng.random() < gpus / 8]
        taken = [first, *others[: gpus - 1]]
        placed = NodeAssignment(
            node_id=node.node_id,
            hostname=node.hostname,
            gpu_indices=tuple(g.index for g in taken),
            gpu_uuids=tuple(g.uuid for g in taken),
            gpu_memory_bytes=10 * GIB,
        )
        store.transition(
            job.id, JobState.SCHEDULED, "placed", assignment=Assignment(nodes=(placed,))
        )
        store.transition(job.id, JobState.RUNNING, "started")
        if kind == 9:
            store.transition(job.id, JobState.SUCCEEDED, "done")
        else:
            running_id = job.id
    return running_id


def deployments(
    store: DeploymentStore, nodes: list[NodeReading], metrics: ServingMetrics, rng: random.Random
) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, Holding]]]:
    views: dict[str, list[dict[str, Any]]] = {}
    holdings = []
    for d in range(12):
        name = f"model-{d}"
        text = f"name: {name}\nmodel: models:/{name}/3\nresources: {{gpu_memory_gb: 4}}\n"
        store.put(load_deployment(text), text)
        views[name] = []
        for r in range(2):
            node = nodes[rng.randrange(len(nodes))]
            gpu = node.gpus[rng.randrange(GPUS_PER_NODE)]
            rid = f"{name}-{r:06x}"
            views[name].append(
                {
                    "id": rid, "phase": "RUNNING", "routed": True, "retiring": False,
                    "node": node.hostname, "gpu_indices": [gpu.index],
                    "gpu_memory_bytes": 4 * GIB, "model_version": "3",
                    "model_uri": f"models:/{name}/3", "error": None,
                }
            )  # fmt: skip
            holdings.append((name, Holding(rid, node.node_id, (gpu.uuid,), 4 * GIB, 1, GIB)))
        for _ in range(500):
            metrics.observe_latency(name, rng.uniform(0.001, 0.05))
            metrics.observe_batch(name, rng.randint(1, 32))
    return views, holdings


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """``app`` on a free 127.0.0.1 port in a thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


FIRST_PAINT_MS = """() => {
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  return paint ? paint.startTime : null;
}"""


def browser_paints(
    base: str, login_path: str, paths: dict[str, str], rounds: int
) -> dict[str, float]:
    """Median first contentful paint of each page in headless chromium, after a warm-up."""
    figures: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-console-chromium-") as profile,
        headless_chromium(Path(profile)) as endpoint,
        sync_playwright() as driver,
    ):
        browser = driver.chromium.connect_over_cdp(endpoint)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.goto(base + login_path)  # the session cookie, as a user logs in
        print(f"{'page':<12} {'paint ms':>10} {'min ms':>8}")
        for name in PAGES:
            page.goto(base + paths[name])  # warm-up: the browser's caches, the server's
            times = []
            for _ in range(rounds):
                page.goto(base + paths[name], wait_until="load")
                page.wait_for_function(FIRST_PAINT_MS, timeout=10_000)  # recorded after load
                painted = page.evaluate(FIRST_PAINT_MS)
                if painted is None:
                    raise SystemExit(f"{paths[name]}: chromium reported no first paint")
                times.append(float(painted))
            figures[name] = statistics.median(times)
            print(f"{name:<12} {figures[name]:>10.1f} {min(times):>8.1f}")
        browser.close()
    return figures


def unresolvable(uri: str) -> ResolvedModel:
    raise RuntimeError(f"the bench resolves no model ({uri}): it only renders pages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-browser", action="store_true", help="server answers only")
    args = parser.parse_args()
    rng = random.Random(14)
    home = Path(tempfile.mkdtemp(prefix="bench-console-"))
    engine = db.connect(db.sqlite_url(home / "jobs.db"))
    store, tokens = JobStore(engine), TokenStore(engine)
    nodes = readings(args.nodes)
    running_id = fill_store(store, nodes, args.jobs, rng)
    metrics = ServingMetrics()
    dep_store = DeploymentStore(engine)
    views, holdings = deployments(dep_store, nodes, metrics, rng)
    active = [JobState.SCHEDULED, JobState.RUNNING]
    pending = sorted(store.find([JobState.PENDING], 100_000), key=lambda j: j.submitted_at)
    queue = [
        {
            "job_id": j.id, "name": j.name, "team": j.team, "priority": j.priority,
            "submitted_at": j.submitted_at, "predicted_start_at": time.time() + 600,
            "reasons": ["waits for 2 GPUs on one node: the most free is 1 (node-004)",
                        "team over its quota: borrowing only after teams under theirs"],
        }
        for j in pending
    ]  # fmt: skip
    names = ModelNames(engine)
    service = JobService(store, home / "logs", lambda: None, names)
    serving = Serving(
        DeploymentService(
            dep_store, unresolvable, lambda n: views.get(n, []), lambda: None, names, store.run_team
        ),
        Router(metrics),
        metrics,
    )
    app = create_app(
        service,
        Auth(tokens, AuditStore(engine)),
        cluster_view=lambda: cluster_table(nodes, store.find(active, 100_000), holdings),
        serving=serving,
        queue_view=lambda: queue,
        console=ConsoleSources(quotas={t: 256 for t in TEAMS}),
    )
    _, token = tokens.create("ops", Role.ADMIN, name="bench")
    paths = {
        "gpus": "/ui/gpus",
        "queue": "/ui/queue",
        "jobs": "/ui/jobs",
        "job": f"/ui/jobs/{running_id}",
        "deployments": "/ui/deployments",
    }
    figures: dict[str, float] = {}
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        print(f"{'page':<12} {'median ms':>10} {'min ms':>8} {'KiB':>8}")
        for page in PAGES:
            warm = client.get(paths[page])  # warm-up: the template compiled, caches filled
            if warm.status_code != 200:
                raise SystemExit(f"{paths[page]} answered {warm.status_code}: {warm.text[:300]}")
            times, size = [], 0
            for _ in range(args.rounds):
                start = time.perf_counter()
                answer = client.get(paths[page])
                times.append((time.perf_counter() - start) * 1000)
                size = len(answer.content)
            figures[page] = statistics.median(times)
            print(f"{page:<12} {figures[page]:>10.1f} {min(times):>8.1f} {size / 1024:>8.0f}")
    result = " ".join(f"{p}_ms={figures[p]:.0f}" for p in PAGES)
    if not args.no_browser:
        with served(app) as base:
            login = TestClient(app).post("/ui/links", headers={"Authorization": f"Bearer {token}"})
            login.raise_for_status()
            paints = browser_paints(base, login.json()["path"], paths, args.rounds)
        result += " " + " ".join(f"browser_{p}_ms={paints[p]:.0f}" for p in PAGES)
    engine.dispose()
    print(f"RESULT console jobs={args.jobs} nodes={args.nodes} {result}")


if __name__ == "__main__":
    main()
