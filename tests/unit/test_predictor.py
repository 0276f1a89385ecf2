"""The run-time predictor: family fallback, quartiles, conditioning on elapsed time, memory."""

from __future__ import annotations

import pytest

from scheduler.core.predictor import History, Run, predict, remaining_s


def runs(keys: tuple[str, ...], durations: list[float], peak: float | None = None) -> list[Run]:
    return [Run(keys, d, float(i), peak) for i, d in enumerate(durations)]


def test_the_most_specific_key_answers_even_with_one_run() -> None:
    h = History([*runs(("name:a", "team:t"), [500.0]), *runs(("name:b", "team:t"), [10.0] * 5)])
    p = predict(h, ("name:a", "team:t"))
    assert p is not None
    assert (p.basis, p.duration_s, p.samples) == ("name:a", 500.0, 1)


@pytest.mark.parametrize(
    ("keys", "basis"),
    [
        (("name:new", "team:t", "cluster"), "team:t"),  # team has 3 runs: enough
        (("name:new", "team:u", "cluster"), "cluster"),  # team u has 2: too few
    ],
)
def test_a_job_without_history_falls_back_to_team_then_cluster(
    keys: tuple[str, ...], basis: str
) -> None:
    h = History(
        [
            *runs(("name:a", "team:t", "cluster"), [100.0, 200.0, 300.0]),
            *runs(("name:b", "team:u", "cluster"), [1000.0, 2000.0]),
        ]
    )
    p = predict(h, keys)
    assert p is not None and p.basis == basis


def test_no_history_at_all_is_no_prediction() -> None:
    assert predict(History(), ("name:a", "cluster")) is None
    assert remaining_s(History(), ("name:a",), 10.0) is None


def test_quartiles_and_peak_memory_come_from_the_recent_runs_only() -> None:
    h = History(recent=4)
    for i, d in enumerate([9999.0, 100.0, 200.0, 300.0, 400.0]):
        h.add(Run(("k",), d, float(i), peak_gpu_memory_gb=80.0 if i == 0 else 10.0 + i))
    p = predict(h, ("k",))
    assert p is not None
    assert (p.low_s, p.duration_s, p.high_s) == (175.0, 250.0, 325.0)
    assert p.spread_s == 75.0
    assert p.peak_gpu_memory_gb == 14.0  # the 80 GB run dropped out of the window


def test_remaining_time_conditions_on_what_the_job_already_ran() -> None:
    h = History(runs(("k",), [100.0, 1000.0, 1200.0]))
    assert remaining_s(h, ("k",), 0.0) == 1000.0
    assert remaining_s(h, ("k",), 500.0) == 600.0  # only the long runs are still possible
    assert remaining_s(h, ("k",), 2000.0) == 2000.0  # outlived them all: as long again


def test_a_negative_or_nan_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="duration"):
        History([Run(("k",), float("nan"), 0.0)])
    with pytest.raises(ValueError, match="recent"):
        History(recent=0)


def test_a_prediction_keeps_the_sample_it_was_made_from() -> None:
    h = History([Run(("k",), d, d) for d in (60.0, 100.0, 200.0)])
    p = predict(h, ("k",))
    assert p is not None
    for _ in range(5):  # runs that finish later do not change it
        h.add(Run(("k",), 10_000.0, 20_000.0))
    assert p.remaining_s(80.0) == pytest.approx(70.0)  # median of (100, 200) less 80
    assert remaining_s(h, ("k",), 80.0) == pytest.approx(9920.0)  # what is known now
    assert p.remaining_s(500.0) == pytest.approx(500.0)  # outlived them all: as long again


def test_a_prediction_carries_how_far_off_its_familys_past_predictions_were() -> None:
    h = History()
    for predicted_s, actual_s in ((100.0, 100.0), (100.0, 150.0), (30.0, 10.0)):
        h.add(Run(("k", "team:t"), actual_s, 1.0, predicted_s=predicted_s))
    p = predict(h, ("k", "team:t"))
    assert p is not None
    # Errors 0, 50/150 and 20/60 (a 10 s run is measured against 60 s): median 1/3.
    assert p.error == pytest.approx(1 / 3)
    h.add(Run(("other", "team:t"), 100.0, 2.0))  # never predicted: no error to learn
    other = predict(h, ("other", "team:t"))
    assert other is not None and other.basis == "other" and other.error is None
    q = predict(History([Run(("k",), 100.0, 1.0, predicted_s=200.0)] * 2), ("k",))
    assert q is not None and q.error is None  # fewer than min_samples were predicted
