"""Benchmark the queue policies on the Philly trace with the trace-driven simulator.

Run from the repository root::

    .venv/bin/python bench/simulate.py [--trace PATH] [--cluster VC] [--jobs N]
                                       [--gpus G] [--gpus-per-node K] [--no-holdout]
                                       [--prediction-noise APE ...]

Default workload: virtual cluster ``6c71a0``, its first 2,000 jobs of 1 to 16
GPUs by submit time, on 48 GPUs (6 nodes x 8): an offered load of about 1.2.
Each policy (``fifo``, ``fifo-backfill``, ``sjf``, ``srpt``, ``ours``,
``predictive``; see ``scheduler/sim/policies.py``) is replayed through the
real queue policy and ``scheduler.core.placement.place`` by
``scheduler.sim.simulator``. GPU memory requests follow the seeded rule in
``scheduler/sim/traces.py`` (they never bind on 80 GB GPUs). A preemption
loses the work since the last checkpoint (every 10 min) and costs 30 s to
restart.

Holdout (on by default; ``--no-holdout`` skips it): the first ``--jobs`` jobs
of each of :data:`HOLDOUT_CLUSTERS`, each on as many GPUs (a multiple of 8)
as give the same offered load as the main slice. They are the two virtual
clusters with the most jobs of 1-16 GPUs after ``6c71a0`` among those whose
first 2,000 jobs need at least two nodes to reach that load (``11cb48``, the
second largest, needs 4 GPUs: on one 8-GPU node its load would be half); a
rule on the workload, not on results. Every
constant of ``srpt``, ``ours`` and ``predictive`` was chosen on ``6c71a0``
only (its first 2,000 jobs; ``predictive``'s error bound was also checked on
its next 2,000).

Prediction quality (``scheduler/sim/prediction_error.py``), from the
``predictive`` replay of the main slice: ``duration_mape``, the median
absolute percentage error of the run time predicted at submission;
``start_mape``, the same for the wait predicted at submission by
``scheduler/sim/forecast.py`` (sampled: every :data:`FORECAST_EVERY`-th
submission), and ``start_mape_waited`` over the sampled jobs that did wait
(over a minute): most jobs start at once and are predicted to, which makes
the median over all of them 0.

Sensitivity study (``--prediction-noise``, default 0.1 0.3 0.5; none: skip
it): what ``predictive`` would gain from better predictions than the trace's
families allow (the live product's families, from MLflow, are far richer).
For each level, the main slice is replayed with every prediction replaced by
the job's *true* run time times a seeded log-normal error whose median
absolute percentage error is that level
(``scheduler/sim/noisy_predictions.py``); trust is still learnt from the
family's past errors. These predictions are synthetic, not from history.

Prints a table per slice and, last, one line ``RESULT simulate …``:
``predictive_vs_srpt_jct``, ``predictive_vs_las_jct`` (``ours`` is LAS) and
``predictive_vs_fifo_backfill_makespan`` on the main slice (targets: <= 1.15,
<= 0.9, <= 1.05); ``holdout_predictive_vs_srpt_jct`` (the worst holdout
slice) and ``holdout_predictive_vs_las_jct`` (the mean over the holdout
slices); ``start_mape``, ``duration_mape``; per noise level (``noise30``:
0.3) ``noise30_predictive_vs_srpt_jct`` and ``noise30_predictive_vs_las_jct``; ``ours_vs_sjf_jct``,
``ours_vs_fifo_backfill_jct``, ``ours_vs_fifo_backfill_makespan``;
``replay_s`` the slowest policy's wall time to replay the main slice, the
forecasts left out (``replay_cpu_s`` the largest CPU time, forecasts
included, which a busy machine does not inflate), and
each policy's average JCT. No timed assertions: this only reports.

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
from scheduler.sim.prediction_error import duration_mape, start_mape  # noqa: E402
from scheduler.sim.simulator import SimConfig, SimResult, simulate  # noqa: E402
from scheduler.sim.traces import TraceJob, read_philly  # noqa: E402

DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "philly_pollux.csv"
ORDER = ("fifo", "fifo-backfill", "sjf", "srpt", "ours", "predictive")
HOLDOUT_ORDER = ORDER[1:]
HOLDOUT_CLUSTERS = ("6214e9", "b436b2")
FORECAST_EVERY = 10
# The rough count that ignores node boundaries, for orientation only.
ROUGH_AVG_JCT_S = {"fifo": 697_000, "fifo-backfill": 327_000, "sjf": 76_000}

Results = dict[str, tuple[SimResult, float]]


def offered_load(jobs: list[TraceJob], gpus: int) -> float:
    """GPU-seconds asked for / (GPUs x the span of submit times)."""
    span_s = jobs[-1].submit_s - jobs[0].submit_s
    return sum(j.duration_s * j.gpus for j in jobs) / (gpus * span_s) if span_s > 0 else 0.0


def run_all(jobs: list[TraceJob], config: SimConfig, names: tuple[str, ...]) -> Results:
    """Every policy's result and the CPU seconds its replay took (forecasts included)."""
    out = {}
    for name in names:
        every = FORECAST_EVERY if name == "predictive" else 0
        began = time.process_time()
        result = simulate(jobs, name, config, forecast_every=every)
        out[name] = (result, time.process_time() - began)
    return out


def print_table(results: Results, rough: bool) -> None:
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


def ratios(results: Results) -> dict[str, float]:
    """predictive's avg JCT against srpt's and ours' (LAS), its makespan against fifo-backfill's."""
    pred, srpt, las, fb = (results[k][0] for k in ("predictive", "srpt", "ours", "fifo-backfill"))
    return {
        "vs_srpt_jct": pred.avg_jct_s / srpt.avg_jct_s,
        "vs_las_jct": pred.avg_jct_s / las.avg_jct_s,
        "vs_fifo_backfill_makespan": pred.makespan_s / fb.makespan_s,
    }


def print_ratios(results: Results) -> None:
    r = ratios(results)
    print(
        f"predictive/srpt avg JCT {r['vs_srpt_jct']:.3f}, predictive/ours(LAS) avg JCT "
        f"{r['vs_las_jct']:.3f}, predictive/fifo-backfill makespan "
        f"{r['vs_fifo_backfill_makespan']:.3f}"
    )


def holdout(args: argparse.Namespace, config: SimConfig) -> list[Results]:
    """Replay the first jobs of other virtual clusters at the main slice's offered load."""
    out = []
    for cluster in HOLDOUT_CLUSTERS:
        jobs = read_philly(args.trace, cluster=cluster, jobs=args.jobs, seed=args.seed)
        per_node = config.gpus_per_node
        gpus = max(per_node, round(offered_load(jobs, 1) / args.load / per_node) * per_node)
        cfg = dataclasses.replace(config, gpus=gpus)
        print(
            f"\nholdout: cluster {cluster}, first {len(jobs):,} jobs of 1-16 GPUs, {gpus} GPUs "
            f"(offered load {offered_load(jobs, gpus):.2f})"
        )
        results = run_all(jobs, cfg, HOLDOUT_ORDER)
        print_table(results, rough=False)
        print_ratios(results)
        out.append(results)
    return out


def sensitivity(
    jobs: list[TraceJob], config: SimConfig, levels: list[float], results: Results
) -> dict[str, str]:
    """``predictive`` on synthetic predictions of each median APE, against srpt and LAS."""
    if not levels:
        return {}
    srpt, las = results["srpt"][0].avg_jct_s, results["ours"][0].avg_jct_s
    print(
        "\nsensitivity (synthetic predictions: true run time x a seeded log-normal error, "
        "not from history), main slice"
    )
    print(f"{'median APE':>10}{'measured':>10}{'avg JCT s':>11}{'vs srpt':>9}{'vs ours':>9}")
    out = {}
    for level in levels:
        r = simulate(jobs, "predictive", config, prediction_noise=level, seed=1)
        measured = duration_mape(r.jobs)
        print(
            f"{level:>10.2f}{fmt(measured):>10}{r.avg_jct_s:>11,.0f}"
            f"{r.avg_jct_s / srpt:>9.3f}{r.avg_jct_s / las:>9.3f}"
        )
        tag = f"noise{round(level * 100):02d}"
        out[f"{tag}_predictive_vs_srpt_jct"] = f"{r.avg_jct_s / srpt:.3f}"
        out[f"{tag}_predictive_vs_las_jct"] = f"{r.avg_jct_s / las:.3f}"
    return out


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--cluster", default="6c71a0")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--gpus", type=int, default=48)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--holdout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also replay other virtual clusters (on by default)",
    )
    parser.add_argument(
        "--prediction-noise",
        type=float,
        nargs="*",
        default=[0.1, 0.3, 0.5],
        metavar="APE",
        help="sensitivity study: median APEs of synthetic predictions (none: skip it)",
    )
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
    results = run_all(jobs, config, ORDER)
    print_table(results, rough=args.cluster == "6c71a0" and args.jobs == 2000)
    print_ratios(results)
    held = holdout(args, config) if args.holdout else []
    noise = sensitivity(jobs, config, args.prediction_noise, results)
    main_ratios = ratios(results)
    held_ratios = [ratios(h) for h in held]
    ours, sjf, fb = (results[k][0] for k in ("ours", "sjf", "fifo-backfill"))
    pred_jobs = results["predictive"][0].jobs
    waited = [j for j in pred_jobs if j.first_start_s - j.submit_s > 60.0]
    slowest = max(results.values(), key=lambda rc: rc[0].replay_s)
    fields = {
        "predictive_vs_srpt_jct": f"{main_ratios['vs_srpt_jct']:.3f}",
        "predictive_vs_las_jct": f"{main_ratios['vs_las_jct']:.3f}",
        "predictive_vs_fifo_backfill_makespan": f"{main_ratios['vs_fifo_backfill_makespan']:.3f}",
        "holdout_predictive_vs_srpt_jct": fmt(
            max((r["vs_srpt_jct"] for r in held_ratios), default=None)
        ),
        "holdout_predictive_vs_las_jct": fmt(
            sum(r["vs_las_jct"] for r in held_ratios) / len(held_ratios) if held_ratios else None
        ),
        "holdout_predictive_vs_fifo_backfill_makespan": fmt(
            max((r["vs_fifo_backfill_makespan"] for r in held_ratios), default=None)
        ),
        "start_mape": fmt(start_mape(pred_jobs)),
        "start_mape_waited": fmt(start_mape(waited)),
        "duration_mape": fmt(duration_mape(pred_jobs)),
        **noise,
        "ours_vs_sjf_jct": f"{ours.avg_jct_s / sjf.avg_jct_s:.3f}",
        "ours_vs_fifo_backfill_jct": f"{ours.avg_jct_s / fb.avg_jct_s:.3f}",
        "replay_s": f"{slowest[0].replay_s:.2f}",
        "replay_cpu_s": f"{max(cpu for _, cpu in results.values()):.2f}",
        "ours_vs_fifo_backfill_makespan": f"{ours.makespan_s / fb.makespan_s:.3f}",
        **{f"{k.replace('-', '_')}_jct_s": f"{results[k][0].avg_jct_s:.0f}" for k in ORDER},
        "ours_preemptions": str(ours.preemptions),
        "predictive_preemptions": str(results["predictive"][0].preemptions),
        "jobs": str(len(jobs)),
        "load": f"{args.load:.2f}",
    }
    print("RESULT simulate " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
