"""The autoscaling policy: a pure function of (config, sample, state, clock)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.autoscale import AutoscaleConfig, AutoscaleState, LoadSample, decide
from scheduler.realtime.spec import deployment_from_data

CONFIG = AutoscaleConfig(
    min_replicas=1,
    max_replicas=10,
    target_queue_per_replica=8,
    slo_p99_ms=100,
    upscale_delay_s=2,
    downscale_delay_s=30,
)


def load(replicas: int, per_replica: float, p99_ms: float | None = 50) -> LoadSample:
    """``per_replica`` requests per replica, all in flight."""
    return LoadSample(
        replicas=replicas, queue_depth=0, in_flight=round(replicas * per_replica), p99_ms=p99_ms
    )


def run(
    samples: list[tuple[float, LoadSample]],
    config: AutoscaleConfig = CONFIG,
    state: AutoscaleState | None = None,
) -> list[int]:
    """The desired counts for a timeline of ``(now, sample)``."""
    out = []
    for now, sample in samples:
        desired, state = decide(config, sample, state, now)
        assert state.desired == desired
        out.append(desired)
    return out


def test_first_call_clamps_the_replicas_present() -> None:
    config = replace(CONFIG, min_replicas=2, max_replicas=4)
    assert decide(config, load(0, 0, None), None, 0.0)[0] == 2
    assert decide(config, load(3, 5), None, 0.0)[0] == 3
    assert decide(config, load(9, 5), None, 0.0)[0] == 4


def test_holds_within_band() -> None:
    # 4..8 per replica, p99 50..100 ms: neither over nor under, for as long as it lasts.
    timeline = [(5.0 * i, load(3, 4 + i % 5, p99_ms=50 + i % 51)) for i in range(120)]
    assert set(run(timeline)) == {3}


def test_within_band_clears_timers() -> None:
    _, state = decide(CONFIG, load(3, 20), None, 0.0)
    assert state.over_since == 0.0
    _, state = decide(CONFIG, load(3, 6), state, 1.0)
    assert state == AutoscaleState(desired=3)


@pytest.mark.parametrize(
    ("requests", "p99_ms", "move"),
    [
        # 4 replicas, target 8 per replica, SLO 100 ms; delays 0 so only the band decides.
        (33, 50, +1),  # 8.25 per replica
        (32, 50, 0),  # exactly the target is not over
        (32, 100, 0),  # exactly the SLO is not over
        (32, 100.5, +1),
        (16, 49, 0),  # exactly half the target is not under
        (15, 49, -1),
        (15, 50, 0),  # exactly half the SLO is not under
        (0, None, -1),  # no traffic
        (0, 120, +1),  # no queue, but slow
    ],
)
def test_band_edges(requests: int, p99_ms: float | None, move: int) -> None:
    config = replace(CONFIG, upscale_delay_s=0, downscale_delay_s=0)
    sample = LoadSample(replicas=4, queue_depth=0, in_flight=requests, p99_ms=p99_ms)
    desired, _ = decide(config, sample, AutoscaleState(4), 0.0)
    assert (desired > 4) - (desired < 4) == move


def test_scales_up_after_delay_not_before() -> None:
    busy = load(2, 12)  # 24 requests: 3 replicas at 8 each
    assert run([(10.0, busy), (11.0, busy), (11.99, busy), (12.0, busy)]) == [2, 2, 2, 3]


def test_a_break_in_overload_restarts_the_upscale_timer() -> None:
    busy, calm = load(2, 12), load(2, 6)
    assert run([(0.0, busy), (1.5, calm), (2.0, busy), (3.9, busy), (4.0, busy)]) == [
        2,
        2,
        2,
        2,
        3,
    ]


def test_scale_up_is_proportional() -> None:
    flood = LoadSample(replicas=2, queue_depth=50, in_flight=14, p99_ms=80)  # 64 / 8 = 8
    assert run([(0.0, flood), (2.0, flood)]) == [2, 8]


def test_scale_up_is_at_least_one_replica() -> None:
    barely = LoadSample(replicas=4, queue_depth=1, in_flight=32, p99_ms=None)  # 8.25 each
    assert run([(0.0, barely), (2.0, barely)]) == [4, 5]


def test_scale_up_is_clamped_to_max() -> None:
    flood = LoadSample(replicas=2, queue_depth=10_000, in_flight=16, p99_ms=5_000)
    assert run([(0.0, flood), (2.0, flood), (4.0, flood)]) == [2, 10, 10]


def test_p99_breach_alone_scales_up() -> None:
    slow = load(2, 1, p99_ms=250)  # light queue, but 2.5x the SLO
    assert run([(0.0, slow), (2.0, slow)]) == [2, 5]


def test_scale_up_repeats_only_after_another_delay() -> None:
    # replicas follow the decisions: 1 -> 2 at t=2, then 2 -> 3 at t=4, not at t=3.
    state: AutoscaleState | None = None
    seen = []
    replicas = 1
    for now in (0.0, 2.0, 3.0, 4.0):
        replicas, state = decide(CONFIG, load(replicas, 1, p99_ms=150), state, now)
        seen.append(replicas)
    assert seen == [1, 2, 2, 3]


def test_scales_down_one_step_per_delay() -> None:
    quiet = load(5, 1, p99_ms=10)
    timeline = [(float(t), quiet) for t in (0, 10, 29, 30, 31, 59, 60, 90)]
    assert run(timeline) == [5, 5, 5, 4, 4, 4, 3, 2]


def test_scale_down_resets_the_timer() -> None:
    quiet = load(5, 1, p99_ms=10)
    desired, state = decide(CONFIG, quiet, AutoscaleState(5, under_since=0.0), 30.0)
    assert (desired, state) == (4, AutoscaleState(4, under_since=30.0))


def test_never_below_min() -> None:
    config = replace(CONFIG, min_replicas=2, downscale_delay_s=0)
    idle = load(4, 0, p99_ms=None)
    assert run([(float(t), idle) for t in range(6)], config) == [3, 2, 2, 2, 2, 2]


def test_no_traffic_counts_as_under() -> None:
    idle = LoadSample(replicas=2, queue_depth=0, in_flight=0, p99_ms=None)
    assert run([(0.0, idle), (30.0, idle)]) == [2, 1]


def test_slow_but_idle_is_not_under() -> None:
    # Few requests, but the p99 is above half the SLO: keep the capacity.
    lukewarm = load(2, 1, p99_ms=60)
    assert run([(0.0, lukewarm), (100.0, lukewarm)]) == [2, 2]


def test_no_replicas_with_waiting_requests_scales_up() -> None:
    stranded = LoadSample(replicas=0, queue_depth=20, in_flight=0, p99_ms=None)
    assert run([(0.0, stranded), (2.0, stranded)]) == [1, 3]


def test_clock_running_backwards_restarts_the_timer() -> None:
    # A controller restart on a fresh monotonic clock must not freeze scaling.
    busy = load(2, 12)
    stale = AutoscaleState(desired=2, over_since=1_000.0)
    desired, state = decide(CONFIG, busy, stale, 5.0)
    assert (desired, state.over_since) == (2, 5.0)
    assert decide(CONFIG, busy, state, 7.0)[0] == 3


def test_zero_delays_act_at_once() -> None:
    config = replace(CONFIG, upscale_delay_s=0, downscale_delay_s=0)
    assert run([(0.0, load(2, 12))], config) == [3]
    assert run([(0.0, load(2, 0, None))], config) == [1]


def test_state_from_a_narrower_config_is_clamped() -> None:
    config = replace(CONFIG, min_replicas=3)
    assert decide(config, load(2, 6), AutoscaleState(2), 0.0)[0] == 3


def test_config_from_spec() -> None:
    spec = deployment_from_data(
        {
            "name": "m",
            "model": "models:/m@a",
            "replicas": {"min": 2, "max": 6},
            "slo": {"p99_ms": 40},
            "autoscaling": {"target_queue_per_replica": 4, "upscale_delay_s": 1},
        }
    )
    assert AutoscaleConfig.from_spec(spec) == AutoscaleConfig(2, 6, 4, 40, 1, 30)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"min_replicas": 0}, "need 1 <= min_replicas <= max_replicas"),
        ({"min_replicas": 5, "max_replicas": 4}, "need 1 <= min_replicas <= max_replicas"),
        ({"target_queue_per_replica": 0}, "target_queue_per_replica must be"),
        ({"slo_p99_ms": float("nan")}, "slo_p99_ms must be"),
        ({"upscale_delay_s": -1}, "upscale_delay_s must be"),
        ({"downscale_delay_s": float("inf")}, "downscale_delay_s must be"),
    ],
)
def test_bad_config_is_refused(bad: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        replace(CONFIG, **bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"replicas": -1, "queue_depth": 0, "in_flight": 0},
        {"replicas": 1, "queue_depth": -1, "in_flight": 0},
        {"replicas": 1, "queue_depth": 0, "in_flight": 0, "p99_ms": float("nan")},
        {"replicas": 1, "queue_depth": 0, "in_flight": 0, "p99_ms": -1.0},
    ],
)
def test_bad_sample_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LoadSample(**bad)  # type: ignore[arg-type]


def test_non_finite_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="now"):
        decide(CONFIG, load(1, 1), None, float("nan"))


# --- properties -------------------------------------------------------------------------

times = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
delays = st.floats(min_value=0, max_value=1e4, allow_nan=False)


@st.composite
def configs(draw: st.DrawFn) -> AutoscaleConfig:
    low = draw(st.integers(1, 50))
    return AutoscaleConfig(
        min_replicas=low,
        max_replicas=draw(st.integers(low, 100)),
        target_queue_per_replica=draw(st.floats(0.5, 32) | st.floats(0.01, 1e4)),
        slo_p99_ms=draw(st.floats(1, 500) | st.floats(0.01, 1e5)),
        upscale_delay_s=draw(delays),
        downscale_delay_s=draw(delays),
    )


# Mostly the sizes a deployment sees, so every rule fires, plus the extremes.
counts = st.integers(0, 200) | st.integers(0, 10**9)
samples = st.builds(
    LoadSample,
    replicas=st.integers(0, 20) | st.integers(0, 10**6),
    queue_depth=counts,
    in_flight=counts,
    p99_ms=st.none() | st.floats(0, 1_000) | st.floats(0, 1e308),
)
states = st.none() | st.builds(
    AutoscaleState,
    desired=st.integers(-5, 120) | st.integers(-(10**6), 10**6),
    over_since=st.none() | times,
    under_since=st.none() | times,
)


@given(configs(), st.lists(st.tuples(samples, times), max_size=30), states)
def test_decision_is_always_within_bounds(
    config: AutoscaleConfig,
    timeline: list[tuple[LoadSample, float]],
    state: AutoscaleState | None,
) -> None:
    for sample, now in timeline:
        desired, state = decide(config, sample, state, now)
        assert config.min_replicas <= desired <= config.max_replicas
        assert state.desired == desired


@given(configs(), samples, states, times)
def test_equal_inputs_give_equal_outputs(
    config: AutoscaleConfig, sample: LoadSample, state: AutoscaleState | None, now: float
) -> None:
    first = decide(config, sample, state, now)
    again = decide(replace(config), replace(sample), state and replace(state), now)
    assert first == again


@settings(max_examples=500)  # the down step needs a light sample and an expired timer
@given(configs(), samples, states, times)
def test_moves_follow_the_load(
    config: AutoscaleConfig, sample: LoadSample, state: AutoscaleState | None, now: float
) -> None:
    before = config.clamp(sample.replicas if state is None else state.desired)
    desired, _ = decide(config, sample, state, now)
    requests = sample.queue_depth + sample.in_flight
    per_replica = requests / sample.replicas if sample.replicas else float(requests and "inf")
    if desired < before:  # down: one step, only when light and fast
        assert desired == before - 1
        assert per_replica < 0.5 * config.target_queue_per_replica
        assert sample.p99_ms is None or sample.p99_ms < 0.5 * config.slo_p99_ms
    if desired > before:  # up: only when over a target
        assert per_replica > config.target_queue_per_replica or (
            sample.p99_ms is not None and sample.p99_ms > config.slo_p99_ms
        )
