"""Benchmark what predictions cost the live loop: one reconcile pass over a long queue.

Run from the repository root::

    .venv/bin/python bench/live_predictions.py [--pending 1000] [--passes 10]

A real job store (SQLite in a temporary directory) holds ``--pending`` waiting
jobs of 20 families, each with three finished runs, on a full cluster of 6
nodes x 8 GPUs (stand-in workers and telemetry, as in the loop's integration
tests). The same passes run twice: with the live default (``predictive``) and no
predictions, then with the job history and the forecaster (its worker
process forecasting the queue while the passes run). Prints the median pass
wall time of each, how long one forecast of that queue takes, and last one line
``RESULT live_predictions pass_ms=… pass_with_predictions_ms=… forecast_s=…``.
No timed assertions: this only reports.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scheduler import db  # noqa: E402
from scheduler.batch.history import JobHistory  # noqa: E402
from scheduler.batch.loop import LoopSettings, Scheduler  # noqa: E402
from scheduler.batch.predictions import Forecaster  # noqa: E402
from scheduler.batch.queue_config import QueueConfig  # noqa: E402
from scheduler.batch.store import JobStore  # noqa: E402
from scheduler.core.states import JobState  # noqa: E402
from tests.unit.placement_factories import _node  # noqa: E402
from workers.interface.executor import LaunchRequest, WorkerPhase, WorkerReport  # noqa: E402
from workers.interface.spec import load_spec  # noqa: E402
from workers.interface.telemetry import NodeReading  # noqa: E402

NODES = 6
GPUS_PER_NODE = 8
FAMILIES = 20


class Cluster:
    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        return tuple(_node(f"node-{i}", gpus=GPUS_PER_NODE) for i in range(NODES))


class Workers:
    def launch(self, request: LaunchRequest) -> None:
        pass

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        return {j: WorkerReport(j, WorkerPhase.RUNNING, pid=1) for j in job_ids}

    def stop(self, job_id: str, grace_s: float) -> None:
        pass

    def release(self, job_id: str) -> None:
        pass


def config(family: int, gpus: int) -> str:
    return (
        f"name: fam-{family}\nentrypoint: bench.dispatch_train:main\n"
        f"config: {{family: {family}}}\ntrain: {{max_steps: 1}}\n"
        f"resources: {{gpus: {gpus}, gpu_memory_gb: 4, cpus: 1, memory_gb: 1}}\n"
    )


def fill(store: JobStore, clock: list[float], pending: int) -> None:
    """History, a full cluster, and the waiting jobs."""
    for run in range(3):
        for f in range(FAMILIES):
            text = config(f, 1)
            job_id = store.create(load_spec(text), text).id
            store.transition(job_id, JobState.SCHEDULED, "placed")
            store.transition(job_id, JobState.RUNNING, "started")
            clock[0] += 60.0 * (f + 1) + 10.0 * run
            store.transition(job_id, JobState.SUCCEEDED, "done")
    for i in range(pending + NODES):
        gpus = GPUS_PER_NODE if i < NODES else (1, 2, 4, 8)[i % 4]
        text = config(i % FAMILIES, gpus)
        store.create(load_spec(text), text)
        clock[0] += 1.0


def passes(loop: Scheduler, n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        loop.run_once()
        out.append(time.perf_counter() - began)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clock = [1_000_000.0]
        engine = db.connect(db.sqlite_url(Path(tmp) / "jobs.db"))
        store = JobStore(engine, clock=lambda: clock[0])
        fill(store, clock, args.pending)
        settings = LoopSettings(
            tracking_uri="unused", log_dir=Path(tmp) / "logs", queue=QueueConfig().policy()
        )
        plain = Scheduler(store, Workers(), Cluster(), settings, lambda: clock[0])
        plain.run_once()  # places the blockers; the rest wait
        plain_s = passes(plain, args.passes)

        history = JobHistory(store)
        history.refresh()
        forecaster = Forecaster(every_s=0.0)  # as often as it may (it rests as long as it works)
        with_predictions = Scheduler(
            store,
            Workers(),
            Cluster(),
            settings,
            lambda: clock[0],
            history=history,
            forecaster=forecaster,
        )
        with_predictions.run_once()
        forecaster.start()
        predicted_s = passes(with_predictions, args.passes)
        forecaster.stop()

        with_predictions.run_once()  # hands the forecaster this pass's queue
        began = time.perf_counter()
        forecaster.run_once()  # inline, as the worker process runs it
        forecast_s = time.perf_counter() - began
        engine.dispose()
    forecast = forecaster.predictions()
    started = sum(1 for p in forecast.values() if p.start_at is not None)
    pass_ms = statistics.median(plain_s) * 1000
    with_ms = statistics.median(predicted_s) * 1000
    print(f"pending jobs                      {args.pending}")
    print(f"median pass, no predictions       {pass_ms:.0f} ms")
    print(f"median pass, history + forecaster {with_ms:.0f} ms")
    print(f"one forecast of the queue         {forecast_s:.2f} s ({started} jobs with a start)")
    print(
        f"RESULT live_predictions pending={args.pending} pass_ms={pass_ms:.0f} "
        f"pass_with_predictions_ms={with_ms:.0f} forecast_s={forecast_s:.2f}"
    )


if __name__ == "__main__":
    main()
