"""Benchmark the queue policies on the Philly trace with the trace-driven simulator.

Run from the repository root::

    .venv/bin/python bench/simulate.py [--trace PATH] [--cluster VC] [--jobs N]
                                       [--gpus G] [--gpus-per-node K] [--holdout]

Default workload: virtual cluster ``6c71a0``, its first 2,000 jobs of 1 to 16
GPUs by submit time, on 48 GPUs (6 nodes x 8): an offered load of about 1.2.
Each policy (``fifo``, ``fifo-backfill``, ``sjf``, ``ours``; see
``scheduler/sim/policies.py``) is replayed through the real queue policy and
``scheduler.core.placement.place`` by ``scheduler.sim.simulator``. GPU memory requests
follow the seeded rule in ``scheduler/sim/traces.py`` (they never bind on 80 GB
GPUs). A preemption loses the work since the last checkpoint (every 10 min)
and costs 30 s to restart.

Prints a table and, last, one line ``RESULT simulate ours_vs_sjf_jct=…
ours_vs_fifo_backfill_jct=… replay_s=… …``: the ratios of ``ours``' average
JCT to ``sjf``'s and to ``fifo-backfill``'s (targets: <= 1 and <= 0.5),
``ours_vs_fifo_backfill_makespan`` (target <= 1), ``replay_s`` the slowest
policy's wall time to replay the trace (target < 10 s; ``replay_cpu_s`` its
CPU time, which a busy machine does not inflate), and each policy's average
JCT. ``--holdout`` also replays two later windows of the same cluster (jobs
2,000-4,000 and 4,000-6,000, on as many GPUs as give the same load), which
played no part in choosing ``ours``' settings. No timed assertions: this
only reports.

Trace: Microsoft Philly (Jeon et al., USENIX ATC'19, CC BY 4.0), as
preprocessed by Pollux (petuum/adaptdl@osdi21-artifact simulator/traces/philly.csv).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scheduler.sim.policies import POLICIES  # noqa: E402
from scheduler.sim.simulator import SimConfig, SimResult, simulate  # noqa: E402
from scheduler.sim.traces import TraceJob, read_philly  # noqa: E402

DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "philly_pollux.csv"
ORDER = ("fifo", "fifo-backfill", "sjf", "ours")
# The rough count that ignores node boundaries, for orientation only.
ROUGH_AVG_JCT_S = {"fifo": 697_000, "fifo-backfill": 327_000, "sjf": 76_000}


def offered_load(jobs: list[TraceJob], gpus: int) -> float:
    """GPU-seconds asked for / (GPUs x the span of submit times)."""
    span_s = jobs[-1].submit_s - jobs[0].submit_s
    return sum(j.duration_s * j.gpus for j in jobs) / (gpus * span_s) if span_s > 0 else 0.0


def run_all(jobs: list[TraceJob], config: SimConfig) -> dict[str, tuple[SimResult, float]]:
    """Every policy's result and the CPU seconds its replay took."""
    out = {}
    for name in ORDER:
        began = time.process_time()
        result = simulate(jobs, name, config)
        out[name] = (result, time.process_time() - began)
    return out


def print_table(results: dict[str, tuple[SimResult, float]], rough: bool) -> None:
    head = (
        f"{'policy':<14}{'avg JCT s':>11}{'p99 JCT s':>12}{'avg queue s':>12}"
        f"{'makespan s':>12}{'util':>7}{'preempt':>9}{'replay s':>10}{'cpu s':>7}{'passes':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, (r, cpu_s) in results.items():
        print(
            f"{name:<14}{r.avg_jct_s:>11,.0f}{r.p99_jct_s:>12,.0f}{r.avg_queue_s:>12,.0f}"
            f"{r.makespan_s:>12,.0f}{r.gpu_util:>7.1%}{r.preemptions:>9,}{r.replay_s:>10.2f}"
            f"{cpu_s:>7.2f}{r.plan_calls:>8,}"
        )
    if rough:
        print(
            "rough count without node boundaries (issue, orientation): "
            + ", ".join(f"{k} ≈ {v:,} s" for k, v in ROUGH_AVG_JCT_S.items())
        )


def holdout(args: argparse.Namespace, config: SimConfig) -> None:
    """Replay later windows of the same cluster at the same offered load."""
    every = read_philly(args.trace, cluster=args.cluster, jobs=3 * args.jobs, seed=args.seed)
    for lo in (args.jobs, 2 * args.jobs):
        window = every[lo : lo + args.jobs]
        if len(window) < args.jobs:
            break
        first = window[0].submit_s
        window = [dataclasses.replace(j, submit_s=j.submit_s - first) for j in window]
        per_node = config.gpus_per_node
        load_at_one_gpu = offered_load(window, 1)
        gpus = max(per_node, round(load_at_one_gpu / args.load / per_node) * per_node)
        cfg = dataclasses.replace(config, gpus=gpus)
        print(
            f"\nholdout: jobs {lo:,}-{lo + args.jobs:,} of {args.cluster} on {gpus} GPUs "
            f"(offered load {offered_load(window, gpus):.2f})"
        )
        results = run_all(window, cfg)
        print_table(results, rough=False)
        ours, sjf, fb = (results[k][0] for k in ("ours", "sjf", "fifo-backfill"))
        print(
            f"ours/sjf avg JCT {ours.avg_jct_s / sjf.avg_jct_s:.3f}, "
            f"ours/fifo-backfill avg JCT {ours.avg_jct_s / fb.avg_jct_s:.3f}, "
            f"makespan {ours.makespan_s / fb.makespan_s:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--cluster", default="6c71a0")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--gpus", type=int, default=48)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", action="store_true", help="also replay later windows")
    args = parser.parse_args()
    for name in ORDER:
        assert name in POLICIES, name
    jobs = read_philly(args.trace, cluster=args.cluster, jobs=args.jobs, seed=args.seed)
    config = SimConfig(gpus=args.gpus, gpus_per_node=args.gpus_per_node)
    args.load = offered_load(jobs, args.gpus)
    print(
        f"trace: {args.trace.name}, cluster {args.cluster}, first {len(jobs):,} jobs of 1-16 GPUs, "
        f"{args.gpus} GPUs ({args.gpus // args.gpus_per_node} nodes x {args.gpus_per_node}), "
        f"offered load {args.load:.2f}"
    )
    results = run_all(jobs, config)
    print_table(results, rough=args.cluster == "6c71a0" and args.jobs == 2000)
    if args.holdout:
        holdout(args, config)
    ours, sjf, fb = (results[k][0] for k in ("ours", "sjf", "fifo-backfill"))
    slowest = max(results.values(), key=lambda rc: rc[0].replay_s)
    fields = {
        "ours_vs_sjf_jct": f"{ours.avg_jct_s / sjf.avg_jct_s:.3f}",
        "ours_vs_fifo_backfill_jct": f"{ours.avg_jct_s / fb.avg_jct_s:.3f}",
        "replay_s": f"{slowest[0].replay_s:.2f}",
        "replay_cpu_s": f"{max(cpu for _, cpu in results.values()):.2f}",
        "ours_vs_fifo_backfill_makespan": f"{ours.makespan_s / fb.makespan_s:.3f}",
        **{f"{k.replace('-', '_')}_jct_s": f"{results[k][0].avg_jct_s:.0f}" for k in ORDER},
        "ours_preemptions": str(ours.preemptions),
        "jobs": str(len(jobs)),
        "load": f"{args.load:.2f}",
    }
    print("RESULT simulate " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
