"""The tags a job's run gets at each attempt's end: its run time summed over its attempts, its
peak GPU memory the largest any attempt measured (``workers.job_runner.end_tags``)."""

from __future__ import annotations

import pytest

from workers.interface.history import ACTUAL_DURATION_TAG, PEAK_GPU_MEMORY_TAG
from workers.job_runner import end_tags


@pytest.mark.parametrize(
    ("earlier", "attempt_s", "peak_gb", "expected"),
    [
        ({}, 12.34, None, {ACTUAL_DURATION_TAG: "12.3"}),  # first attempt, on CPU
        ({}, 12.0, 3.5, {ACTUAL_DURATION_TAG: "12.0", PEAK_GPU_MEMORY_TAG: "3.500"}),
        (  # a resumed attempt adds its time; the peak is the largest of the attempts'
            {ACTUAL_DURATION_TAG: "100.0", PEAK_GPU_MEMORY_TAG: "7.000", "other": "x"},
            20.0,
            5.0,
            {ACTUAL_DURATION_TAG: "120.0", PEAK_GPU_MEMORY_TAG: "7.000"},
        ),
        (
            {ACTUAL_DURATION_TAG: "100.0", PEAK_GPU_MEMORY_TAG: "7.000"},
            20.0,
            9.25,
            {ACTUAL_DURATION_TAG: "120.0", PEAK_GPU_MEMORY_TAG: "9.250"},
        ),
        (  # an attempt that measured nothing keeps what an earlier one measured
            {ACTUAL_DURATION_TAG: "100.0", PEAK_GPU_MEMORY_TAG: "7.000"},
            1.0,
            None,
            {ACTUAL_DURATION_TAG: "101.0", PEAK_GPU_MEMORY_TAG: "7.000"},
        ),
    ],
)
def test_end_tags_fold_in_the_earlier_attempts(
    earlier: dict[str, str], attempt_s: float, peak_gb: float | None, expected: dict[str, str]
) -> None:
    tags = {t.key: t.value for t in end_tags(earlier, "succeeded", attempt_s, peak_gb)}
    assert tags == {"jobworker.outcome": "succeeded", **expected}
