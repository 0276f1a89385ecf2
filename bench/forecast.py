"""Time the forecast of a large live queue (``scheduler.sim.forecast``).

Run from the repository root::

    .venv/bin/python bench/forecast.py [--pending N] [--running M] [--nodes K]
                                       [--repeat R] [--exact]

A seeded synthetic cluster: ``--nodes`` nodes x 8 GPUs (128), ``--running``
jobs of 1-4 GPUs (500) holding most of them, ``--pending`` jobs of 1-16 GPUs
(1,000; 16 is a gang on 2 nodes) submitted over the last day, with predicted
run times from minutes to a day (a tenth of them unknown), in two teams at
two priorities. For each queue policy (the live loop's ``predictive`` default and
its ``fifo`` alternative, the simulator's ``sjf`` and ``ours``) the queue is
first settled by one pass of that policy at ``now`` (its preemptions
requeued, its starts running), as the live loop hands it over; then it is
forecast ``--repeat`` times, and the figure is the fastest (wall ms, and CPU
ms, which a busy machine inflates less). ``--exact`` also replays every event
(``step_fraction=0``) and prints the median difference of the predicted
starts, relative to their lead time. Last line: ``RESULT forecast pending=…
nodes=… ms=…`` with the slowest policy's wall figure, then each policy's.
No assertions: this only reports.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scheduler.batch.queue_config import QueueConfig  # noqa: E402
from scheduler.core.model import QueuedJob, QueuePolicy, RunningJob  # noqa: E402
from scheduler.core.queue_policy import Capacity, Held, plan  # noqa: E402
from scheduler.sim.forecast import Forecast, forecast  # noqa: E402
from scheduler.sim.policies import POLICIES  # noqa: E402

GPUS_PER_NODE = 8
DAY_S = 86400.0
POLICY_SET: dict[str, QueuePolicy] = {
    "live": QueueConfig().policy(),  # the live loop's default (predictive, with aging)
    "live-fifo": QueueConfig(mode="fifo").policy(),  # its FIFO-with-priority alternative
    "sim-sjf": POLICIES["sjf"].queue,
    "sim-ours": POLICIES["ours"].queue,
}


def workload(
    pending_n: int, running_n: int, nodes_n: int, seed: int = 7
) -> tuple[list[QueuedJob], list[RunningJob], dict[str, int], dict[str, float], float]:
    rnd = random.Random(seed)
    now = 10 * DAY_S
    node_gpus = {f"node-{i:03d}": GPUS_PER_NODE for i in range(nodes_n)}
    free = dict(node_gpus)
    running: list[RunningJob] = []
    remaining: dict[str, float] = {}
    for i in range(running_n):
        gpus = rnd.choice((1, 1, 1, 2, 2, 4))
        fits = [n for n, f in free.items() if f >= gpus]
        if not fits:
            break
        node = fits[0]
        free[node] -= gpus
        started = now - rnd.uniform(0.0, DAY_S)
        left_s = rnd.uniform(60.0, DAY_S)
        job_id = f"r{i}"
        running.append(
            RunningJob(job_id, rnd.choice(("vision", "nlp")), rnd.choice((0, 1)), gpus, (node,),
                       started, est_end=now + left_s)
        )  # fmt: skip
        remaining[job_id] = left_s
    pending: list[QueuedJob] = []
    for i in range(pending_n):
        gpus = rnd.choice((1, 1, 2, 4, 8, 16))
        per_node, nodes = (gpus, 1) if gpus <= GPUS_PER_NODE else (GPUS_PER_NODE, 2)
        duration_s = min(DAY_S, rnd.lognormvariate(7.5, 1.5))
        known = rnd.random() > 0.1
        job_id = f"p{i}"
        pending.append(
            QueuedJob(job_id, rnd.choice(("vision", "nlp")), rnd.choice((0, 1)), per_node,
                      now - rnd.uniform(0.0, DAY_S), nodes=nodes,
                      est_duration_s=duration_s if known else None)
        )  # fmt: skip
        if known:
            remaining[job_id] = duration_s
    return pending, running, node_gpus, remaining, now


def settle(
    pending: list[QueuedJob],
    running: list[RunningJob],
    node_gpus: dict[str, int],
    policy: QueuePolicy,
    now: float,
) -> tuple[list[QueuedJob], list[RunningJob]]:
    """The queue after the live loop's pass at ``now``: what ``plan`` preempts requeued,
    what it orders started (on the nodes the queue policy's count model fits them to)."""
    qp = plan(pending, running, node_gpus, policy, now)
    gone = set(qp.preempt)
    kept = [r for r in running if r.job_id not in gone]
    cap = Capacity(
        node_gpus, (Held(r.job_id, r.team, r.gpus, r.node_ids, 0, 0, 0, False) for r in kept)
    )
    by_id = {q.job_id: q for q in pending}
    started: list[RunningJob] = []
    for job_id in qp.order:
        q = by_id[job_id]
        nodes = cap.fit(q.gpus, q.nodes)
        if nodes:
            cap.add(Held(job_id, q.team, q.gpus, nodes, 0, 0, 0, False))
            est_end = None if q.est_duration_s is None else now + q.est_duration_s
            started.append(RunningJob(job_id, q.team, q.priority, q.gpus, nodes, now,
                                      q.attained_gpu_s, est_end))  # fmt: skip
    requeued = [
        QueuedJob(r.job_id, r.team, r.priority, r.gpus, r.started_at, len(r.node_ids),
                  r.attained_gpu_s + (now - r.started_at) * r.gpus * len(r.node_ids),
                  None if r.est_end is None else r.est_end - now, now)
        for r in running if r.job_id in gone
    ]  # fmt: skip
    begun = {r.job_id for r in started}
    return [q for q in pending if q.job_id not in begun] + requeued, kept + started


def start_error(exact: dict[str, Forecast], coarse: dict[str, Forecast], now: float) -> float:
    """Median |coarse - exact| predicted start over the exact lead time, of jobs started later."""
    errors = [
        abs(coarse[j].start_at - f.start_at) / (f.start_at - now)
        for j, f in exact.items()
        if now < f.start_at < math.inf and coarse[j].start_at < math.inf
    ]
    return statistics.median(errors) if errors else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pending", type=int, default=1000)
    parser.add_argument("--running", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--exact", action="store_true", help="also replay every event (step_fraction=0), compare"
    )
    args = parser.parse_args()
    raw = workload(args.pending, args.running, args.nodes)
    node_gpus, remaining, now = raw[2], raw[3], raw[4]
    print(
        f"{args.pending} jobs pending, {args.running} running, {args.nodes} nodes x "
        f"{GPUS_PER_NODE} GPUs; after the policy's pass at now:"
    )
    figures: dict[str, float] = {}
    for name, policy in POLICY_SET.items():
        pending, running = settle(raw[0], raw[1], node_gpus, policy, now)
        wall_s = cpu_s = math.inf
        for _ in range(args.repeat):
            began, began_cpu = time.perf_counter(), time.process_time()
            out = forecast(pending, running, node_gpus, policy, now, remaining)
            wall_s = min(wall_s, time.perf_counter() - began)
            cpu_s = min(cpu_s, time.process_time() - began_cpu)
        starts = [out[q.job_id].start_at for q in pending]
        last_h = max((s for s in starts if s < math.inf), default=now) - now
        line = (
            f"{name:<14} {len(pending):5} pending {len(running):4} running  "
            f"{wall_s * 1000:7.0f} ms ({cpu_s * 1000:5.0f} ms CPU)  last start in "
            f"{last_h / 3600:5.1f} h, {sum(s == math.inf for s in starts)} beyond the horizon"
        )
        if args.exact:
            began = time.process_time()
            exact = forecast(pending, running, node_gpus, policy, now, remaining, step_fraction=0)
            exact_ms = (time.process_time() - began) * 1000
            err = start_error(exact, out, now)
            line += f"; exact replay {exact_ms:6.0f} ms CPU, median start error {err:.1%} of lead"
            figures[f"{name}_start_err"] = round(err, 3)
        print(line)
        figures[f"{name}_ms"] = round(wall_s * 1000)
        figures[f"{name}_cpu_ms"] = round(cpu_s * 1000)
    slowest = max(v for k, v in figures.items() if k.endswith("_ms") and "cpu" not in k)
    extra = " ".join(f"{k.replace('-', '_')}={v}" for k, v in figures.items())
    print(f"RESULT forecast pending={args.pending} nodes={args.nodes} ms={slowest} {extra}")


if __name__ == "__main__":
    main()
