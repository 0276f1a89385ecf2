"""The trace reader, the trace-driven simulator and ``jobworker simulate``.

Small synthetic traces written to ``tmp_path``, one replay of the real Philly
file with a few hundred jobs, and the CLI through ``typer.testing.CliRunner``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from scheduler.cli.simulate import simulate as simulate_command
from scheduler.core.model import QueuePolicy
from scheduler.sim.policies import POLICIES, SimPolicy
from scheduler.sim.prediction_error import duration_mape, median_ape, start_mape
from scheduler.sim.simulator import JobResult, SimConfig, SimResult, shape, simulate
from scheduler.sim.traces import GIB, TraceError, TraceJob, read_philly

# The first 400 jobs of VC 6c71a0 of the Philly trace (see tests/data/README.md).
PHILLY = Path(__file__).resolve().parents[1] / "data" / "philly_6c71a0_first400.csv"
HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"


def write_trace(path: Path, rows: list[tuple[str, float, int, str]]) -> Path:
    """A Philly-format CSV: (timestamp, duration s, GPUs, cluster) per row."""
    lines = [f"{ts},{d},{g},{d * g},{vc}\n" for ts, d, g, vc in rows]
    path.write_text(HEADER + "".join(lines) + "\n")
    return path


def ts(second: int) -> str:
    return f"2017-10-01 00:{second // 60:02d}:{second % 60:02d}"


def job(job_id: str, submit_s: float, duration_s: float, gpus: int = 1) -> TraceJob:
    return TraceJob(job_id, submit_s, duration_s, gpus, 8 * GIB, "vc")


def by_id(result: SimResult) -> dict[str, JobResult]:
    return {j.job_id: j for j in result.jobs}


# --------------------------------------------------------------------------- traces


def test_read_philly_filters_sorts_and_rebases(tmp_path: Path) -> None:
    rows = [
        (ts(30), 10.0, 1, "a"),
        (ts(10), 20.0, 4, "a"),
        (ts(20), 30.0, 32, "a"),  # more than max_gpus
        (ts(5), 40.0, 1, "b"),  # another cluster
        (ts(40), 50.0, 2, "a"),
    ]
    path = write_trace(tmp_path / "t.csv", rows)
    jobs = read_philly(path, cluster="a", max_gpus=16)
    assert [(j.submit_s, j.duration_s, j.gpus) for j in jobs] == [
        (0.0, 20.0, 4),
        (20.0, 10.0, 1),
        (30.0, 50.0, 2),
    ]
    assert [j.submit_s for j in read_philly(path, cluster="a", jobs=2)] == [0.0, 20.0]
    assert len(read_philly(path)) == 4  # every cluster, the blank last line skipped


def test_read_philly_refuses_unknown_clusters_and_bad_files(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.csv", [(ts(1), 10.0, 1, "a")])
    with pytest.raises(TraceError, match="unknown cluster 'zz'; the trace has: a"):
        read_philly(path, cluster="zz")
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,duration\n2017-10-01 00:00:00,5\n")
    with pytest.raises(TraceError, match="missing column"):
        read_philly(bad)
    broken = write_trace(tmp_path / "broken.csv", [("yesterday", 10.0, 1, "a")])
    with pytest.raises(TraceError, match="line 2: bad timestamp"):
        read_philly(broken)


def test_memory_rule_is_seeded_per_job_and_fits_the_size_table(tmp_path: Path) -> None:
    rows = [(ts(i), 10.0, random.Random(i).choice([1, 2, 4, 8, 16]), "a") for i in range(40)]
    path = write_trace(tmp_path / "t.csv", rows)
    everything = {j.job_id: j for j in read_philly(path, seed=7)}
    first_ten = read_philly(path, seed=7, jobs=10)
    # A job's request does not depend on how many jobs were read.
    assert all(everything[j.job_id].gpu_memory_bytes == j.gpu_memory_bytes for j in first_ten)
    for j in everything.values():
        allowed = {1: {8, 16, 24, 40}, 2: {16, 24, 40, 64}, 4: {16, 24, 40, 64}}.get(
            j.gpus, {24, 40, 64, 76}
        )
        assert j.gpu_memory_bytes // GIB in allowed
    other_seed = read_philly(path, seed=8)
    assert [j.gpu_memory_bytes for j in other_seed] != [
        everything[j.job_id].gpu_memory_bytes for j in other_seed
    ]


# --------------------------------------------------------------------------- simulator


def test_shapes_split_large_jobs_evenly_over_nodes() -> None:
    assert shape(4, 8) == (4, 1)
    assert shape(16, 8) == (8, 2)
    assert shape(12, 8) == (6, 2)
    assert shape(11, 8) == (1, 11)  # a prime count splits only one GPU per node


def random_trace(seed: int, n: int) -> list[TraceJob]:
    rng = random.Random(seed)
    at = 0.0
    out = []
    for i in range(n):
        at += rng.expovariate(1 / 300)
        gpus = rng.choice([1, 1, 1, 2, 4, 8, 16])
        out.append(job(f"j{i:03d}", at, rng.lognormvariate(7, 1.5), gpus))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fifo_never_starts_a_later_job_before_an_earlier_one(seed: int) -> None:
    result = simulate(random_trace(seed, 80), "fifo", SimConfig(gpus=16, gpus_per_node=8))
    starts = [j.first_start_s for j in sorted(result.jobs, key=lambda j: j.submit_s)]
    assert len(starts) == 80
    assert starts == sorted(starts)


@pytest.mark.parametrize("policy", ["fifo", "fifo-backfill", "sjf"])
def test_without_preemption_a_job_runs_once_and_gpus_are_never_overcommitted(policy: str) -> None:
    trace = random_trace(4, 80)
    result = simulate(trace, policy, SimConfig(gpus=16, gpus_per_node=8))
    assert result.preemptions == 0 and len(result.jobs) == len(trace)
    for j in result.jobs:
        assert j.end_s - j.first_start_s == pytest.approx(j.duration_s)
        assert j.first_start_s >= j.submit_s
    edges = sorted(
        [(j.first_start_s, j.gpus) for j in result.jobs] + [(j.end_s, -j.gpus) for j in result.jobs]
    )
    held = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):  # ends before starts at a tie
        held += delta
        assert held <= 16


def test_sjf_beats_fifo_when_a_long_job_is_first_in_line() -> None:
    trace = [job("blocker", 0.0, 100.0), job("long", 1.0, 1000.0)]
    trace += [job(f"short{i}", 2.0 + i, 10.0) for i in range(4)]
    config = SimConfig(gpus=1, gpus_per_node=1)
    fifo, sjf = simulate(trace, "fifo", config), simulate(trace, "sjf", config)
    # fifo: the shorts wait for the long job; sjf: they run right after the blocker.
    assert by_id(fifo)["short0"].first_start_s == pytest.approx(1100.0)
    assert by_id(sjf)["short0"].first_start_s == pytest.approx(100.0)
    assert sjf.avg_jct_s < fifo.avg_jct_s


def test_backfill_starts_a_short_job_early_without_delaying_the_head() -> None:
    trace = [
        job("first", 0.0, 100.0, gpus=2),
        job("head", 1.0, 100.0, gpus=4),  # must wait for "first"
        job("short", 2.0, 50.0, gpus=2),  # ends at 52, before "first" does
        job("long", 3.0, 500.0, gpus=2),  # would hold the head's GPUs past t=100
    ]
    config = SimConfig(gpus=4, gpus_per_node=4)
    backfill = by_id(simulate(trace, "fifo-backfill", config))
    strict = by_id(simulate(trace, "fifo", config))
    assert backfill["short"].first_start_s == pytest.approx(2.0)
    assert backfill["head"].first_start_s == pytest.approx(100.0)
    assert backfill["long"].first_start_s == pytest.approx(200.0)
    assert strict["head"].first_start_s == pytest.approx(100.0)
    assert strict["short"].first_start_s == pytest.approx(200.0)


def las(thresholds_gpu_s: tuple[float, ...], min_run_s: float = 0.0) -> SimPolicy:
    queue = QueuePolicy(
        mode="las",
        las_thresholds_gpu_s=thresholds_gpu_s,
        aging_s_per_priority=None,
        min_run_s=min_run_s,
    )
    return SimPolicy("las", queue, estimates="none")


@pytest.mark.parametrize("checkpoint_every_s", [600.0, 500.0, 0.0])
def test_a_preempted_job_loses_work_since_its_checkpoint_and_pays_to_restart(
    checkpoint_every_s: float,
) -> None:
    trace = [job("long", 0.0, 5000.0), job("short", 1500.0, 100.0)]
    config = SimConfig(
        gpus=1, gpus_per_node=1, checkpoint_every_s=checkpoint_every_s, restart_s=30.0
    )
    result = simulate(trace, las((1000.0,)), config)
    jobs = by_id(result)
    # "long" is in queue 1 after 1,000 GPU-s; "short" arrives in queue 0 and preempts it.
    assert jobs["long"].preemptions == 1 and result.preemptions == 1
    assert jobs["short"].first_start_s == pytest.approx(1500.0)
    saved = (
        1500.0 if checkpoint_every_s == 0 else (1500.0 // checkpoint_every_s) * checkpoint_every_s
    )
    assert result.lost_gpu_s == pytest.approx(1500.0 - saved)
    restart_at = 1600.0
    assert jobs["long"].end_s == pytest.approx(restart_at + config.restart_s + 5000.0 - saved)
    assert jobs["long"].queued_s == pytest.approx(restart_at - 1500.0)


def test_a_job_protected_by_min_run_s_is_not_preempted_too_early() -> None:
    trace = [job("long", 0.0, 5000.0), job("short", 1500.0, 100.0)]
    config = SimConfig(gpus=1, gpus_per_node=1)
    jobs = by_id(simulate(trace, las((1000.0,), min_run_s=1800.0), config))
    # Preempted when its 30 minutes are up, not at the short job's arrival.
    assert jobs["short"].first_start_s == pytest.approx(1800.0)


def test_srpt_preempts_a_long_job_for_a_short_arrival_and_beats_sjf() -> None:
    trace = [job("long", 0.0, 5000.0), job("short", 1500.0, 100.0)]
    config = SimConfig(gpus=1, gpus_per_node=1)  # checkpoint every 600 s, restart 30 s
    srpt, sjf = simulate(trace, "srpt", config), simulate(trace, "sjf", config)
    jobs = by_id(srpt)
    # "long" has run past min_run_s with 3,500 s left: the 100 s arrival preempts it at once.
    assert jobs["short"].first_start_s == pytest.approx(1500.0) and jobs["long"].preemptions == 1
    # It kept 1,200 s (its last checkpoint), restarts at 1,600 and pays 30 s.
    assert jobs["long"].end_s == pytest.approx(1600.0 + 30.0 + 5000.0 - 1200.0)
    assert by_id(sjf)["short"].first_start_s == pytest.approx(5000.0)  # sjf never preempts
    assert srpt.avg_jct_s < sjf.avg_jct_s


def vc_job(job_id: str, submit_s: float, duration_s: float, vc: str) -> TraceJob:
    return TraceJob(job_id, submit_s, duration_s, 1, 8 * GIB, vc)


# srpt's ranks on the predictions (every one trusted, as ``predictive`` would once earned).
SRPT_ON_PREDICTIONS = SimPolicy("srpt-on-predictions", POLICIES["srpt"].queue, "predicted")


def test_predictions_use_only_runs_that_finished_before_submission() -> None:
    trace = [
        vc_job("a0", 0.0, 100.0, "A"),  # the only run of family A, ends at t=100
        vc_job("blocker", 1.0, 1000.0, "Z"),  # holds the GPU from t=100
        vc_job("x", 50.0, 30.0, "A"),  # submitted before a0 ended: no prediction
        vc_job("y", 200.0, 30.0, "A"),  # submitted after: predicted 100 s
    ]
    jobs = by_id(simulate(trace, SRPT_ON_PREDICTIONS, SimConfig(gpus=1, gpus_per_node=1)))
    assert jobs["x"].predicted_duration_s is None
    assert jobs["y"].predicted_duration_s == pytest.approx(100.0)
    # y (estimated) preempts the blocker (unknown: ranked last) when its protection ends and
    # goes before x, submitted earlier. Had x been predicted from a0, which ended while x
    # waited, x would have gone first (same estimate, earlier submit).
    assert jobs["y"].first_start_s == pytest.approx(700.0)
    assert jobs["x"].first_start_s > jobs["y"].first_start_s


def test_predictive_trusts_a_family_once_its_past_predictions_were_right() -> None:
    # Family B always runs 5,000 s, one job at a time: b1-b3 are predicted exactly, so b4's
    # family has a past error of 0 and b4 is ranked by its 5,000 s (ours' third queue).
    trace = [vc_job(f"b{i}", 6000.0 * i, 5000.0, "B") for i in range(5)]
    trace.append(vc_job("z0", 5050.0, 100.0, "Z"))  # not predicted (too little history)
    # Predicted from z0, but nobody knows how good Z's predictions are: ranked by LAS, queue 0.
    trace.append(vc_job("z", 24_100.0, 100.0, "Z"))
    config = SimConfig(gpus=1, gpus_per_node=1)
    predictive = by_id(simulate(trace, "predictive", config))
    # z preempts b4 as soon as b4's protection (10 min) ends.
    assert predictive["z"].first_start_s == pytest.approx(24_600.0)
    # LAS waits until b4 has attained 1/3 GPU-hour; so does predictive while B is untrusted
    # (b1, the first predicted run, found its family with no past error yet).
    assert by_id(simulate(trace, "ours", config))["z"].first_start_s == pytest.approx(25_200.0)
    early = [vc_job("b0", 0.0, 5000.0, "B"), vc_job("b1", 6000.0, 5000.0, "B")]
    early.append(vc_job("z", 6100.0, 100.0, "Z"))
    assert by_id(simulate(early, "predictive", config))["z"].first_start_s == pytest.approx(7200.0)


def test_prediction_noise_replaces_predictions_by_the_truth_times_a_seeded_error() -> None:
    rng = random.Random(1)
    trace = [job(f"j{i}", 100.0 * i, rng.choice((100.0, 1000.0, 5000.0))) for i in range(300)]
    config = SimConfig(gpus=64)
    noisy = simulate(trace, "predictive", config, prediction_noise=0.3, seed=7)
    mape = duration_mape(noisy.jobs)
    assert mape is not None and abs(mape - 0.3) < 0.06
    assert all(j.predicted_duration_s is not None for j in noisy.jobs)  # even with no history
    again = simulate(trace, "predictive", config, prediction_noise=0.3, seed=7)
    assert [j.predicted_duration_s for j in again.jobs] == [
        j.predicted_duration_s for j in noisy.jobs
    ]


def test_forecast_starts_at_submission_and_their_error() -> None:
    trace = [job("a", 0.0, 100.0), job("b", 10.0, 50.0), job("c", 20.0, 500.0)]
    result = simulate(trace, "srpt", SimConfig(gpus=1, gpus_per_node=1), forecast_every=1)
    jobs = by_id(result)
    # On exact run times and no later arrival that passes them, the forecast is right.
    assert [jobs[k].predicted_start_s for k in "abc"] == pytest.approx([0.0, 100.0, 150.0])
    assert [jobs[k].first_start_s for k in "abc"] == pytest.approx([0.0, 100.0, 150.0])
    assert start_mape(result.jobs) == 0.0
    assert duration_mape(result.jobs) is None  # nothing had finished when they were submitted
    # Only every k-th submission is forecast.
    sampled = simulate(trace, "srpt", SimConfig(gpus=1, gpus_per_node=1), forecast_every=2)
    assert [j.job_id for j in sampled.jobs if j.predicted_start_s is not None] == ["b"]


def test_prediction_errors_are_median_ape_with_a_floor() -> None:
    def result(job_id: str, wait_s: float, predicted_start_s: float | None) -> JobResult:
        return JobResult(
            job_id, 1, 0.0, wait_s, wait_s + 100.0, 100.0, wait_s, 0, 150.0, predicted_start_s
        )

    jobs = [result("now", 0.0, 0.0), result("late", 600.0, 300.0), result("never", 0.0, None)]
    # Waits: 0 vs 0 (error 0), 300 vs 600 (0.5); "never" has no forecast.
    assert start_mape(jobs) == pytest.approx(0.25)
    assert start_mape([result("early", 0.0, 120.0)]) == pytest.approx(2.0)  # 120 s / 60 s floor
    assert duration_mape(jobs) == pytest.approx(0.5)
    assert median_ape([]) is None


def test_a_two_node_gang_waits_for_both_nodes() -> None:
    trace = [job("one", 0.0, 100.0), job("gang", 1.0, 50.0, gpus=16), job("two", 2.0, 10.0)]
    result = by_id(simulate(trace, "fifo", SimConfig(gpus=16, gpus_per_node=8)))
    assert result["gang"].first_start_s == pytest.approx(100.0)
    assert result["two"].first_start_s == pytest.approx(150.0)


def test_jobs_that_cannot_fit_are_skipped_and_counted() -> None:
    trace = [job("ok", 0.0, 10.0, gpus=8), job("too-big", 1.0, 10.0, gpus=32)]
    result = simulate(trace, "ours", SimConfig(gpus=16, gpus_per_node=8))
    assert [j.job_id for j in result.jobs] == ["ok"] and result.skipped == 1


def test_a_replay_of_the_real_trace_finishes_every_job() -> None:
    jobs = read_philly(PHILLY, cluster="6c71a0", jobs=150)
    assert len(jobs) == 150 and jobs[0].submit_s == 0.0
    config = SimConfig(gpus=16, gpus_per_node=8)
    results = {name: simulate(jobs, name, config) for name in POLICIES}
    for name, result in results.items():
        assert len(result.jobs) == 150 and result.unfinished == 0, name
        assert all(j.end_s - j.submit_s >= j.duration_s for j in result.jobs), name
        assert 0 < result.useful_util <= result.gpu_util <= 1.0, name
        assert result.p99_jct_s >= result.avg_jct_s > 0, name
    starts = [j.first_start_s for j in sorted(results["fifo"].jobs, key=lambda j: j.submit_s)]
    assert starts == sorted(starts)
    assert results["ours"].preemptions > 0


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(simulate_command)
    return app


@pytest.mark.parametrize("policy", ["sjf", "srpt", "predictive"])
def test_cli_prints_one_json_object(cli: typer.Typer, tmp_path: Path, policy: str) -> None:
    path = write_trace(tmp_path / "t.csv", [(ts(i), 60.0 * (i + 1), 1, "a") for i in range(5)])
    out = CliRunner().invoke(
        cli, [str(path), "--gpus", "2", "--gpus-per-node", "2", "--json", "--policy", policy]
    )
    assert out.exit_code == 0, out.output
    figures = json.loads(out.stdout)
    assert figures["policy"] == policy and figures["jobs"] == 5 and figures["gpus"] == 2
    for key in ("avg_jct_s", "p99_jct_s", "avg_queue_s", "makespan_s", "gpu_util", "replay_s"):
        assert key in figures


def test_cli_prints_a_table(cli: typer.Typer, tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.csv", [(ts(i), 60.0, 1, "a") for i in range(3)])
    out = CliRunner().invoke(cli, [str(path), "--cluster", "a", "--gpus", "8"])
    assert out.exit_code == 0, out.output
    assert "average JCT" in out.stdout and "makespan" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "lifo"], "unknown policy 'lifo'"),
        (["--cluster", "nope"], "unknown cluster 'nope'"),
        (["--gpus", "0"], "--gpus and --gpus-per-node must be at least 1"),
    ],
)
def test_cli_refuses_bad_arguments_with_exit_2(
    cli: typer.Typer, tmp_path: Path, args: list[str], message: str
) -> None:
    path = write_trace(tmp_path / "t.csv", [(ts(1), 60.0, 1, "a")])
    out = CliRunner().invoke(cli, [str(path), *args])
    assert out.exit_code == 2
    assert "error:" in out.output and message in out.output


def test_cli_names_a_missing_file(cli: typer.Typer, tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, [str(tmp_path / "missing.csv")])
    assert out.exit_code == 2 and "error: cannot read" in out.output
