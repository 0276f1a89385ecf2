"""The reconcile loop schedules with predictions: the history it learns from the store, the
queue order it gives, the starts it forecasts, the tags it launches with.

The job store is real (SQLite) and so is the history read from it; the workers are a
stand-in, the cluster one node of two simulated GPUs, and the clock is the test's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler import db
from scheduler.batch.history import JobHistory
from scheduler.batch.loop import LoopSettings, Scheduler
from scheduler.batch.predictions import Forecaster
from scheduler.batch.queue_config import QueueConfig
from scheduler.batch.store import JobStore
from scheduler.core.model import QueuePolicy
from scheduler.core.predictor import predict
from scheduler.core.states import JobState
from tests.unit.placement_factories import _gpu, _node
from workers.interface.executor import LaunchRequest, WorkerPhase, WorkerReport
from workers.interface.history import RunFacts
from workers.interface.spec import load_spec
from workers.interface.telemetry import GIB, NodeReading


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class OneNode:
    def nodes(self, fresh: bool = False) -> tuple[NodeReading, ...]:
        return (_node("node-a", gpus=[_gpu(0), _gpu(1)]),)


class Workers:
    """Runs whatever is launched until the test says it succeeded."""

    def __init__(self) -> None:
        self.launched: list[LaunchRequest] = []
        self.succeeded: set[str] = set()

    def launch(self, request: LaunchRequest) -> None:
        self.launched.append(request)

    def poll(
        self, job_ids: Sequence[str], world_sizes: Mapping[str, int] | None = None
    ) -> dict[str, WorkerReport]:
        return {
            j: WorkerReport(
                j, WorkerPhase.SUCCEEDED if j in self.succeeded else WorkerPhase.RUNNING, pid=7
            )
            for j in job_ids
        }

    def stop(self, job_id: str, grace_s: float) -> None:
        pass

    def release(self, job_id: str) -> None:
        pass

    def active(self) -> set[str]:
        return {r.job_id for r in self.launched}


class Facts:
    """A RunFactsReader that knows some runs' peaks and counts what it was asked."""

    def __init__(self, peaks: dict[str, float]) -> None:
        self.peaks = peaks
        self.asked: list[str] = []

    def read(self, run_ids: Sequence[str]) -> dict[str, RunFacts]:
        self.asked.extend(run_ids)
        return {r: RunFacts(r, self.peaks[r], None) for r in run_ids if r in self.peaks}


def config(name: str, gpus: int = 2) -> str:
    return (
        f"name: {name}\nentrypoint: tests.integration.user_code:run_until_stopped\n"
        "train: {max_steps: 1}\n"
        f"resources: {{gpus: {gpus}, gpu_memory_gb: 4, cpus: 1, memory_gb: 1}}\n"
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[JobStore]:
    engine = db.connect(db.sqlite_url(tmp_path / "jobs.db"))
    yield JobStore(engine, clock=clock)
    engine.dispose()


def submit(store: JobStore, name: str, gpus: int = 2) -> str:
    text = config(name, gpus)
    return store.create(load_spec(text), text).id


def finished(
    store: JobStore,
    clock: Clock,
    name: str,
    ran_s: float,
    run_id: str = "",
    predicted_s: float | None = None,
) -> None:
    """A job of ``name`` that waited, ran ``ran_s`` and succeeded (predicted to run
    ``predicted_s`` when it started)."""
    job_id = submit(store, name)
    clock.now += 5.0
    store.transition(job_id, JobState.SCHEDULED, "placed", predicted_s=predicted_s)
    store.transition(job_id, JobState.RUNNING, "started", run_id=run_id or None)
    clock.now += ran_s
    store.transition(job_id, JobState.SUCCEEDED, "done")


def loop_over(
    store: JobStore,
    workers: Workers,
    clock: Clock,
    tmp_path: Path,
    policy: QueuePolicy,
    history: JobHistory | None = None,
    forecaster: Forecaster | None = None,
) -> Scheduler:
    settings = LoopSettings(tracking_uri="unused", log_dir=tmp_path / "logs", queue=policy)
    return Scheduler(
        store, workers, OneNode(), settings, clock, history=history, forecaster=forecaster
    )


# -- the history ---------------------------------------------------------------------------


def test_history_learns_run_times_and_peaks_of_succeeded_jobs_only(
    store: JobStore, clock: Clock
) -> None:
    for ran_s, run in [(100.0, "r1"), (140.0, "r2"), (120.0, "r3")]:
        finished(store, clock, "sweep", ran_s, run)
    failed = submit(store, "sweep")
    store.transition(failed, JobState.FAILED, "bad config")
    facts = Facts({"r1": 6.0, "r2": 9.5})
    history = JobHistory(store, facts)
    assert predict(history.latest, ["name:default/sweep"]) is None  # before the first refresh

    history.refresh()

    p = predict(history.latest, ["name:default/sweep"])
    assert p is not None
    assert (p.duration_s, p.samples, p.peak_gpu_memory_gb) == (120.0, 3, 9.5)
    history.refresh()  # a run MLflow answered for is not asked about again; r3 is
    assert sorted(facts.asked) == ["r1", "r2", "r3", "r3"]


def test_history_learns_how_right_a_familys_predictions_were(store: JobStore, clock: Clock) -> None:
    for ran_s, predicted_s in [(100.0, 100.0), (100.0, 150.0), (100.0, 80.0)]:
        finished(store, clock, "sweep", ran_s, predicted_s=predicted_s)
    history = JobHistory(store)
    history.refresh()
    p = predict(history.latest, ["name:default/sweep"])
    assert p is not None and p.error == pytest.approx(0.2)  # median of 0, 0.5, 0.2
    finished(store, clock, "fresh", 100.0)  # started before any prediction: no error known
    history.refresh()
    fresh = predict(history.latest, ["name:default/fresh"])
    assert fresh is not None and fresh.error is None


def test_a_failing_refresh_keeps_the_last_history(store: JobStore, clock: Clock) -> None:
    finished(store, clock, "sweep", 60.0)
    history = JobHistory(store)
    kept = history.refresh()
    store.engine.dispose()
    store.engine = sa.create_engine("sqlite:////nonexistent/dir/jobs.db")
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
        history.refresh()
    assert history.latest is kept


# -- the loop ------------------------------------------------------------------------------


@pytest.fixture
def full(store: JobStore, clock: Clock, tmp_path: Path) -> tuple[str, str, str]:
    """History: three runs each of ``short`` (10 s) and ``long`` (1,000 s), each predicted
    right when it started (so the predictive order trusts both families). Then a job of
    neither holds both GPUs, and ``long`` then ``short`` wait for both."""
    for _ in range(3):
        finished(store, clock, "short", 10.0, predicted_s=10.0)
        finished(store, clock, "long", 1000.0, predicted_s=1000.0)
    blocker = submit(store, "blocker")
    loop_over(store, Workers(), clock, tmp_path, QueuePolicy()).run_once()
    assert store.get(blocker).state is JobState.SCHEDULED
    clock.now += 1.0
    long_id = submit(store, "long")
    clock.now += 1.0
    short_id = submit(store, "short")
    return blocker, long_id, short_id


def test_the_live_default_puts_the_shortest_predicted_first_fifo_keeps_submit_order(
    store: JobStore, clock: Clock, tmp_path: Path, full: tuple[str, str, str]
) -> None:
    _, long_id, short_id = full
    history = JobHistory(store)
    history.refresh()
    default = loop_over(store, Workers(), clock, tmp_path, QueueConfig().policy(), history)
    default.run_once()
    assert [e.job_id for e in default.queue()] == [short_id, long_id]

    fifo = loop_over(store, Workers(), clock, tmp_path, QueuePolicy(mode="fifo"), history)
    fifo.run_once()
    assert [e.job_id for e in fifo.queue()] == [long_id, short_id]


def test_predicted_starts_follow_the_queue_and_the_launch_carries_the_prediction(
    store: JobStore, clock: Clock, tmp_path: Path, full: tuple[str, str, str]
) -> None:
    blocker, _, short_id = full
    history, forecaster, workers = JobHistory(store), Forecaster(), Workers()
    history.refresh()
    loop = loop_over(store, workers, clock, tmp_path, QueueConfig().policy(), history, forecaster)
    loop.run_once()
    forecaster.run_once()

    short, long = loop.queue()
    assert short.job_id == short_id
    assert (short.predicted_duration_s, short.prediction_basis) == (10.0, "name:default/short")
    assert (long.predicted_duration_s, long.prediction_basis) == (1000.0, "name:default/long")
    assert short.predicted_start_at is not None and long.predicted_start_at is not None
    assert clock.now < short.predicted_start_at < long.predicted_start_at
    assert long.predicted_start_at == pytest.approx(short.predicted_start_at + 10.0)
    assert long.predicted_end_at == pytest.approx(long.predicted_start_at + 1000.0)
    # no job named blocker ever ran: it is predicted from the jobs of the same work (the
    # same entrypoint and options), all six
    running = loop.prediction(blocker)
    assert running is not None and running.basis is not None
    assert running.basis.startswith("work:default/") and running.samples == 6
    assert running.end_at == short.predicted_start_at == running.start_at + 505.0

    workers.succeeded.add(blocker)
    loop.run_once()

    assert [r.job_id for r in workers.launched] == [short_id]
    assert store.get(short_id).predicted_s == 10.0  # kept: how right it was is learnt
    tags = workers.launched[0].tags
    assert float(tags["jobworker.predicted_duration_s"]) == 10.0
    assert tags["jobworker.prediction_basis"] == "name:default/short"


def test_an_auto_memory_job_asks_for_its_familys_measured_peak(
    store: JobStore, clock: Clock, tmp_path: Path
) -> None:
    for run in ("r1", "r2", "r3"):
        finished(store, clock, "sized", 60.0, run)
    history = JobHistory(store, Facts({"r1": 6.0, "r2": 9.3, "r3": 7.0}))
    history.refresh()
    text = config("sized", gpus=1).replace("gpu_memory_gb: 4", "gpu_memory_gb: auto")
    job_id = store.create(load_spec(text), text).id

    loop_over(store, Workers(), clock, tmp_path, QueueConfig().policy(), history).run_once()

    job = store.get(job_id)
    assert job.state is JobState.SCHEDULED and job.assignment is not None
    assert job.assignment.nodes[0].gpu_memory_bytes == int(10.5 * GIB)  # 9.3 GiB + 10 %
    assert "asking for 10.5 GiB per GPU" in store.history(job_id)[-1].reason
