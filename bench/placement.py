"""Benchmark the placement pass the live loop runs: 128 nodes x 8 GPUs, 10,000 pending jobs.

Run from the repository root::

    .venv/bin/python bench/placement.py [--trace PATH] [--jobs N] [--nodes N] [--reps N]
        [--seed N] [--large-nodes N] [--large-jobs N] [--large-reps N]

The *live pass* is what ``scheduler.batch.loop`` runs each pass, by the same
functions (``bench/placement_live.py``): each pending job record's demand and
queue entry from the loop's cross-pass cache (``PendingInputs``), the snapshot
from the node readings, the active jobs' records and the real-time replicas'
holdings (``snapshot_of``), then the queue policy's plan and its placement
(``plan_pass``: ``plan()`` and ``place_plan()``). The cache makes two passes
cost differently, so both are timed: the *cold* pass, with a fresh cache (every
demand and queue entry built, as after a restart: ``cold_pass_ms``), and the
*steady* pass right after it, the one the live loop runs pass after pass: the
cold pass's placements are running by then, 2% of the running jobs ended, and
1% of the pending jobs are new or back in the queue (``live_pass_ms``, target
100 ms). The cold pass has started what fits, so the steady one places few
jobs and mostly says why the others wait, as a loop with a backlog does (the
table shows how many each placed). Both at ``--nodes`` x 8 GPUs with ``--jobs`` pending and at
``--large-nodes`` x 8 with ``--large-jobs`` pending (``large_live_pass_ms``,
``large_cold_pass_ms``, ``--large-reps`` pairs of passes); the job records
(``live_inputs``) mix GPU counts, memory per GPU, CPUs, host memory, GPU types,
teams, priorities and gangs, under the default queue policy (fifo, aging,
backfill, preemption). The *full pass* is ``place()`` alone on
:func:`make_jobs`' demands, as recorded before (``full_pass_ms``).

Job sizes follow the empirical ``num_gpus`` distribution of the Microsoft
Philly trace as preprocessed by the Pollux authors
(``shared/traces/philly_pollux.csv``; see ``shared/traces/README.md``). The
trace has no memory or GPU type, so the rest is synthetic, seeded, and
documented in :func:`make_jobs` and :func:`make_cluster`.

Prints small tables and, last, one line
``RESULT placement live_pass_ms=… full_pass_ms=… large_live_pass_ms=… cold_pass_ms=… …``
(each ``*_ms`` is the median CPU time (``time.process_time``) of the passes
after a warm-up, ``pack`` strategy; the tables add the spread (min-max) and wall times;
``decisions_per_s`` = jobs / ``full_pass_ms``; ``pack_frag``/``spread_frag``
are the fragmentation each strategy leaves at half load). No timed
assertions: this only reports.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.placement_live import (  # noqa: E402
    CHANGED_SHARE,
    FINISHED_SHARE,
    MEMORY_CLASSES_GIB,
    MEMORY_WEIGHTS,
    live_inputs,
    steady_passes,
)
from scheduler.core.model import (  # noqa: E402
    ClusterSnapshot,
    Demand,
    Holding,
    PlacementPolicy,
)
from scheduler.core.placement import fragmentation, place, with_placements  # noqa: E402
from workers.interface.telemetry import (  # noqa: E402
    GIB,
    GpuProcess,
    GpuReading,
    GpuUuid,
    NodeId,
    NodeReading,
)

T = TypeVar("T")
TARGET_MS = 100.0
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "philly_pollux.csv"
TRACE_CITATION = (
    "Microsoft Philly trace (Jeon et al., USENIX ATC'19, CC BY 4.0), as preprocessed "
    "by Pollux (petuum/adaptdl@osdi21-artifact simulator/traces/philly.csv)"
)

# (name as NVML reports it, memory GiB, share of nodes, CPUs, host GiB, NVLink topology)
NODE_TYPES: list[tuple[str, int, float, int, int, str]] = [
    ("NVIDIA H100 80GB HBM3", 80, 0.25, 128, 2048, "nvswitch"),
    ("NVIDIA A100-SXM4-80GB", 80, 0.20, 128, 1024, "nvswitch"),
    ("NVIDIA A100-SXM4-40GB", 40, 0.20, 96, 1024, "nvswitch"),
    ("Tesla V100-SXM2-32GB", 32, 0.20, 80, 512, "cube-mesh"),
    ("Tesla T4", 16, 0.15, 64, 384, "pcie"),
]
# Per-GPU memory request classes (GiB) and their probabilities: small fine-tunes,
# mid-size CNN/BERT-large training, large batches / 1-3B models, 7B-class models.
LIVED_IN_NODES = 0.6  # share of nodes with holdings, other tenants, busy or failed GPUs


def read_gpu_sizes(trace: Path) -> Counter[int]:
    """``num_gpus`` -> number of jobs in the trace."""
    with trace.open(newline="") as f:
        return Counter(int(row["num_gpus"]) for row in csv.DictReader(f) if row["num_gpus"])


def _cube_mesh_peers(i: int) -> set[int]:
    """DGX-1 hybrid cube-mesh: GPUs 0-3 and 4-7 fully linked, plus i <-> i^4."""
    quad = range(0, 4) if i < 4 else range(4, 8)
    return {j for j in quad if j != i} | {i ^ 4}


def make_cluster(rng: random.Random, n_nodes: int) -> ClusterSnapshot:
    """Nodes of one GPU type each (mix in ``NODE_TYPES``), 60% of them lived in.

    On a lived-in node each GPU is, independently: 10% held exclusively by one
    of our running jobs (pid visible for two thirds of them), 3% holding a
    shared replica whose process is not visible yet (8 GiB unseen), 15%
    carrying another tenant's memory (10-60% of total, util 5-60%), 6% busy
    above 90% util, 2% unavailable, else idle. The other 40% of the nodes are
    idle: whole free nodes, as after a drain. NVLink: all-to-all on H100/A100
    (NVSwitch), hybrid cube-mesh on V100 (DGX-1), none on T4 (PCIe).
    """
    weights = [t[2] for t in NODE_TYPES]
    nodes: list[NodeReading] = []
    holdings: list[Holding] = []
    for n in range(n_nodes):
        name, mem_gib, _, cpus, host_gib, topo = rng.choices(NODE_TYPES, weights)[0]
        node_id = NodeId(f"node-{n:03d}")
        uuids = [GpuUuid(f"GPU-{n:03d}-{i}") for i in range(8)]
        gpus: list[GpuReading] = []
        lived_in = rng.random() < LIVED_IN_NODES
        for i in range(8):
            total = mem_gib * GIB
            used, util, available = GIB // 2, rng.uniform(0, 5), True
            procs: tuple[GpuProcess, ...] = ()
            roll = rng.random() if lived_in else 1.0
            if roll < 0.10:
                job = f"running-{n}-{i}"
                pid = 10_000 + n * 8 + i
                used += rng.randint(4, mem_gib // 2) * GIB
                util = rng.uniform(60, 100)
                if rng.random() < 2 / 3:
                    procs = (GpuProcess(pid, used - GIB // 2),)
                holdings.append(Holding(job, node_id, (uuids[i],), used, 8, 64 * GIB, pid=pid))
            elif roll < 0.13:
                holdings.append(
                    Holding(
                        f"replica-{n}-{i}", node_id, (uuids[i],), 8 * GIB, 2, 16 * GIB, shared=True
                    )
                )
            elif roll < 0.28:
                used += int(total * rng.uniform(0.10, 0.60))
                util = rng.uniform(5, 60)
            elif roll < 0.34:
                used += int(total * rng.uniform(0.05, 0.30))
                util = rng.uniform(92, 100)
            elif roll < 0.36:
                available = False
            if topo == "nvswitch":
                peers = tuple(u for j, u in enumerate(uuids) if j != i)
            elif topo == "cube-mesh":
                peers = tuple(uuids[j] for j in sorted(_cube_mesh_peers(i)))
            else:
                peers = ()
            gpus.append(
                GpuReading(
                    index=i,
                    uuid=uuids[i],
                    name=name,
                    memory_total_bytes=total,
                    memory_used_bytes=used,
                    memory_free_bytes=total - used,
                    util_pct=round(util, 1),
                    memory_util_pct=None,
                    temperature_c=None,
                    power_w=None,
                    processes=procs,
                    mig_mode=False,
                    nvlink_peers=peers,
                    available=available,
                )
            )
        nodes.append(
            NodeReading(
                node_id, f"host-{n:03d}", cpus, host_gib * GIB, tuple(gpus), "simulated", 0.0
            )
        )
    return ClusterSnapshot(tuple(nodes), tuple(holdings))


def make_jobs(rng: random.Random, sizes: Counter[int], n_jobs: int) -> list[Demand]:
    """Pending jobs with trace-distributed GPU counts and a seeded memory rule.

    GPUs: drawn from the trace's ``num_gpus`` histogram; a job needing more
    than 8 becomes multi-node with ``nodes = ceil(g / 8)`` and
    ``gpus = ceil(g / nodes)`` per node (16 -> 2x8, 12 -> 2x6).
    Memory per GPU: ``MEMORY_CLASSES_GIB`` with ``MEMORY_WEIGHTS``.
    Type: 10% of the jobs below 64 GiB pin ``"H100|A100"``.
    Host: 8 CPUs and 64 GiB per GPU. 3% of the 1-GPU jobs are shared
    real-time replicas (4 or 12 GiB, 2 CPUs, 16 GiB).
    """
    values, counts = zip(*sorted(sizes.items()), strict=True)
    jobs: list[Demand] = []
    for j, g in enumerate(rng.choices(values, counts, k=n_jobs)):
        nodes = max(1, math.ceil(g / 8))
        per_node = math.ceil(g / nodes)
        mem = rng.choices(MEMORY_CLASSES_GIB, MEMORY_WEIGHTS)[0]
        gpu_type = "H100|A100" if mem < 64 and rng.random() < 0.10 else None
        if per_node == 1 and nodes == 1 and rng.random() < 0.03:
            mem = rng.choice([4, 12])
            jobs.append(Demand(f"replica-{j}", 1, mem * GIB, 2, 16 * GIB, shared=True))
            continue
        jobs.append(
            Demand(
                f"job-{j}",
                per_node,
                mem * GIB,
                8.0 * per_node,
                64 * GIB * per_node,
                gpu_type,
                nodes,
            )
        )
    return jobs


def timed(run: Callable[[], T], reps: int) -> tuple[list[float], list[float], T]:
    """CPU and wall ms of ``reps`` runs after one warm-up, and the last result.

    CPU time (``time.process_time``) is the pass's own cost; on a shared
    machine wall time also counts other processes' turns, so both are reported.
    """
    result = run()  # warm-up
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(reps):
        gc.collect()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = run()
        cpu.append((time.process_time() - start_cpu) * 1000)
        wall.append((time.perf_counter() - start_wall) * 1000)
    return cpu, wall, result


def spread_text(values: list[float]) -> str:
    """``"41.2 (39.8-45.0)"``: the median and the range."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def half_load(snapshot: ClusterSnapshot, jobs: list[Demand]) -> list[Demand]:
    """The queue's head asking for about half of the free GPUs (for fragmentation)."""
    free = _free_gpus(snapshot)
    head: list[Demand] = []
    asked = 0
    for job in jobs:
        if asked + job.gpus * job.nodes > free // 2:
            break
        head.append(job)
        asked += job.gpus * job.nodes
    return head


def _free_gpus(snapshot: ClusterSnapshot) -> int:
    held = {u for h in snapshot.holdings for u in h.gpu_uuids}
    return sum(
        1
        for n in snapshot.nodes
        for g in n.gpus
        if g.available and g.uuid not in held and (g.util_pct or 0) <= 90
    )


def main() -> None:
    """Parse flags, run both strategies, print the table and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="philly_pollux.csv; a relative path is taken from the repository root",
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--large-nodes", type=int, default=1024)
    parser.add_argument("--large-jobs", type=int, default=50_000)
    parser.add_argument("--large-reps", type=int, default=3)
    args = parser.parse_args()

    trace: Path = args.trace if args.trace.is_absolute() else REPO_ROOT / args.trace
    sizes = read_gpu_sizes(trace)
    rng = random.Random(args.seed)
    snapshot = make_cluster(rng, args.nodes)
    jobs = make_jobs(rng, sizes, args.jobs)
    head = half_load(snapshot, jobs)
    n_trace = sum(sizes.values())
    hist = ", ".join(f"{g}: {c} ({c / n_trace:.2%})" for g, c in sorted(sizes.items()))
    demand_gpus = sum(d.gpus * d.nodes for d in jobs)
    n_gpus = sum(len(n.gpus) for n in snapshot.nodes)
    print(f"job sizes from {trace.name} ({n_trace} jobs): {TRACE_CITATION}")
    print(f"  jobs per num_gpus: {hist}")
    print(
        f"cluster: {args.nodes} nodes, {n_gpus} GPUs ({_free_gpus(snapshot)} free), "
        f"{len(snapshot.holdings)} holdings; {len(jobs)} pending jobs asking for "
        f"{demand_gpus} GPUs; seed {args.seed}; python {sys.version.split()[0]}"
    )
    base = PlacementPolicy()
    print(
        f"fragmentation before: {fragmentation(snapshot, base):.3f}; "
        f"half load = the first {len(head)} jobs"
    )
    print(
        f"{'strategy':<8} {'cpu ms':>7} {'wall ms':>8} {'decisions/s':>12} {'placed':>7} "
        f"{'GPUs used':>9} {'frag@half':>9} {'frag@full':>9}"
    )
    results: dict[str, tuple[float, float, float, float]] = {}
    for strategy in ("pack", "spread"):
        policy = PlacementPolicy(strategy=strategy)
        cpus, walls, decisions = timed(functools.partial(place, snapshot, jobs, policy), args.reps)
        cpu_ms, wall_ms = statistics.median(cpus), statistics.median(walls)
        placed = [d for d in decisions if d.placed]
        used = {u for d in placed for p in d.placement for u in p.gpu_uuids}
        full = fragmentation(with_placements(snapshot, jobs, decisions), policy)
        half_decisions = place(snapshot, head, policy)
        half = fragmentation(with_placements(snapshot, head, half_decisions), policy)
        results[strategy] = (cpu_ms, wall_ms, half, full)
        print(
            f"{strategy:<8} {cpu_ms:>7.1f} {wall_ms:>8.1f} {len(jobs) / (cpu_ms / 1000):>12,.0f} "
            f"{len(placed):>7} {len(used):>9} {half:>9.3f} {full:>9.3f}"
        )
    print(
        f"ms = median of {args.reps} passes after a warm-up; decisions/s = jobs / cpu ms; "
        "frag = share of free GPUs on nodes that are not entirely free; "
        "pack_frag/spread_frag below = frag@half"
    )
    print()
    print(
        "live pass (demands, snapshot, plan, place_plan; pack, default queue policy): "
        "cold = a fresh cache, steady = the pass after it"
    )
    print(
        f"{'nodes':>6} {'pending':>8} {'running':>8} {'cold cpu ms':>22} {'placed':>7} "
        f"{'steady cpu ms':>22} {'steady wall ms':>22} {'order':>6} {'placed':>7} "
        f"{'preempt':>8}"
    )
    live: list[float] = []
    cold: list[float] = []
    for n_nodes, n_jobs, reps in (
        (args.nodes, args.jobs, args.reps),
        (args.large_nodes, args.large_jobs, args.large_reps),
    ):
        live_rng = random.Random(args.seed)
        cluster = make_cluster(live_rng, n_nodes)
        active, pending, replicas = live_inputs(live_rng, cluster, sizes, n_jobs)
        colds, cpus, walls, cold_placed, (queue_plan, decisions) = steady_passes(
            live_rng, cluster.nodes, active, pending, replicas, base, reps
        )
        live.append(statistics.median(cpus))
        cold.append(statistics.median(colds))
        print(
            f"{n_nodes:>6} {n_jobs:>8} {len(active):>8} {spread_text(colds):>22} "
            f"{cold_placed:>7} {spread_text(cpus):>22} {spread_text(walls):>22} "
            f"{len(queue_plan.order):>6} "
            f"{sum(d.placed for d in decisions):>7} {len(queue_plan.preempt):>8}"
        )
    print(
        f"ms = median of {args.reps} pairs of passes ({args.large_reps} for the large one) "
        f"after a warm-up pair, range in brackets; steady = the pass after a cold one, with "
        f"its placements running, {FINISHED_SHARE:.0%} of the running jobs ended and "
        f"{CHANGED_SHARE:.0%} of the pending jobs new or back in the queue; "
        f"steady pass / place() alone = {live[0] / results['pack'][0]:.2f}"
    )
    pack, spread = results["pack"], results["spread"]
    print(
        f"RESULT placement live_pass_ms={live[0]:.1f} full_pass_ms={pack[0]:.1f} "
        f"large_live_pass_ms={live[1]:.1f} cold_pass_ms={cold[0]:.1f} "
        f"large_cold_pass_ms={cold[1]:.1f} "
        f"decisions_per_s={len(jobs) / (pack[0] / 1000):.0f} target_ms={TARGET_MS:.0f} "
        f"wall_ms={pack[1]:.1f} spread_ms={spread[0]:.1f} "
        f"pack_frag={pack[2]:.3f} spread_frag={spread[2]:.3f}"
    )


if __name__ == "__main__":
    main()
